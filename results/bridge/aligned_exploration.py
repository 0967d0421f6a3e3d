"""Exploration that led to the aligned bridge (bridge/aligned.py); a scratch script, kept so its figures
can be rerun:  VAR=raw|rms|ctx PIECE=0|1 NVOC=N TAU=t python results/bridge/aligned_exploration.py LAYER NTRAIN WIDE NCORPUS
(VAR=ctx: only the context tokens are sent; PIECE=1: same-piece targets; NVOC: random-vocabulary
sequences; TAU>0: the vocabulary projection). 60 held-out items of results/bridge/val.jsonl.

Experiment: per-position lexical alignment bridge. Source layer-L state at each source token ->
ridge map -> target embedding of the char-aligned target tokens. Then let the target answer."""
import sys, time, json, os, torch
VAR = os.environ.get("VAR", "raw"); PIECE = int(os.environ.get("PIECE", "1")); NVOC = int(os.environ.get("NVOC", "0"))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
torch.set_num_threads(2)
from latentwire.runtime import AgentModel
from bridge.data import generate, read_jsonl
from bridge.eval import exact_match, item_nll

LAYER = int(sys.argv[1]) if len(sys.argv) > 1 else 12
NTRAIN = int(sys.argv[2]) if len(sys.argv) > 2 else 600
WIDE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.7
src = AgentModel("smollm2-135m"); tgt = AgentModel("gemma3-270m")
W_emb = tgt.embed.weight.float() * float(getattr(tgt.embed, "embed_scale", 1.0))

def pairs(item, raw=None):
    text = raw if raw is not None else src.render(f"{item['context']}\n\nQuestion: {item['question']}", __import__('latentwire.runtime', fromlist=['x']).SOURCE_INSTRUCTION)
    s = src.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    t = tgt.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(s.input_ids)
    h = src.hidden_states(ids, LAYER).float()
    temb = tgt.embed(torch.tensor(t.input_ids)[None])[0].float()
    Y = torch.zeros(len(ids), temb.shape[1]); ok = torch.zeros(len(ids), dtype=torch.bool)
    tids = []
    for i, (a, b) in enumerate(s.offset_mapping):
        if PIECE:
            g = tgt.tok(text[a:b], add_special_tokens=False).input_ids
            if len(g) == 1:
                Y[i] = W_emb[g[0]]; ok[i] = True; tids.append(g[0]); continue
        w = []
        for j, (c, d) in enumerate(t.offset_mapping):
            ov = min(b, d) - max(a, c)
            if ov > 0: w.append((j, ov))
        if w:
            tot = sum(o for _, o in w)
            Y[i] = sum(temb[j] * (o / tot) for j, o in w); ok[i] = True
            tids.append(max(w, key=lambda x: x[1])[0] and t.input_ids[max(w, key=lambda x: x[1])[0]])
        else:
            tids.append(-1)
    ans = torch.zeros(len(ids), dtype=torch.bool)
    global ctxmask
    ctxmask = torch.zeros(len(ids), dtype=torch.bool)
    if item is not None:
        c0 = text.find(item["context"]); c1 = c0 + len(item["context"])
        for i, (a, b) in enumerate(s.offset_mapping):
            ctxmask[i] = min(b, c1) - max(a, c0) > 0
    if item is not None:
        a0 = text.find(item["context"]) + item["context"].find(item["answer"]); a1 = a0 + len(item["answer"])
        for i, (a, b) in enumerate(s.offset_mapping):
            ans[i] = min(b, a1) - max(a, a0) > 0
    return h, Y, ok, torch.tensor(tids), ans

t0 = time.time()
train = generate(NTRAIN, "train", seed=0, wide=WIDE)
X, Y = [], []
NCORP = int(sys.argv[4]) if len(sys.argv) > 4 else 0
from latentwire.textdata import text_chunks
for it in train:
    h, y, ok, _, _ = pairs(it); X.append(h[ok]); Y.append(y[ok])
for ch in text_chunks(NCORP, min_chars=600):
    h, y, ok, _, _ = pairs(None, ch); X.append(h[ok]); Y.append(y[ok])
# vocabulary rows: random source tokens, each regressed to the target token of the same string
g = torch.Generator().manual_seed(0)
V = src.tok.vocab_size
for _ in range(NVOC):
    ids = torch.randint(0, V, (256,), generator=g)
    h = src.hidden_states(ids, LAYER).float()
    for i, t in enumerate(ids.tolist()):
        piece = src.tok.decode([t])
        gi = tgt.tok(piece, add_special_tokens=False).input_ids
        if len(gi) == 1:
            X.append(h[i:i+1]); Y.append(W_emb[gi[0]][None])
X, Y = torch.cat(X), torch.cat(Y)
print("rows", X.shape, "prep s", round(time.time() - t0, 1), flush=True)
mu, sd = X.mean(0), X.std(0) + 1e-5
Xn = torch.cat([(X - mu) / sd, torch.ones(len(X), 1)], 1)
lam = 1.0 * len(X) / 1000
A = torch.linalg.solve(Xn.T @ Xn + lam * torch.eye(Xn.shape[1]), Xn.T @ Y)
def mapit(h): return torch.cat([(h - mu) / sd, torch.ones(len(h), 1)], 1) @ A

RMS = tgt.embed_rms()
val = read_jsonl(str(__import__("pathlib").Path(__file__).resolve().parent / "val.jsonl"), 60)
em = {"latent": [], "direct": []}; nn_acc = []; ans_acc = []
for it in val:
    h, y, ok, tids, ans = pairs(it)
    soft = mapit(h)
    if VAR in ("rms", "ctx"):
        soft = soft * torch.rsqrt(soft.pow(2).mean(-1, keepdim=True)) * RMS
    if VAR == "ctx":
        soft = soft[ctxmask]
        tids = tids[ctxmask]; ans = ans[ctxmask]
    TAU = float(os.environ.get("TAU", "0"))
    if TAU > 0:
        d2 = soft.pow(2).sum(-1, keepdim=True) - 2 * soft @ W_emb.T + W_emb.pow(2).sum(-1)[None]
        p = torch.softmax(-d2 / (RMS**2 * 640 * TAU), -1)
        soft = p @ W_emb
    soft = soft.bfloat16().float()
    dist = soft.pow(2).sum(-1, keepdim=True) - 2 * soft @ W_emb.T
    pred = dist.argmin(-1); m = tids >= 0
    nn_acc.append(float((pred[m] == tids[m]).float().mean()))
    am = m & ans
    ans_acc.append(float((pred[am] == tids[am]).float().mean()) if am.any() else 0.0)
    g = tgt.answer(soft, it["question"], 16).text
    em["latent"].append(exact_match(g, it["answer"]))
    if len(em["direct"]) < 20:
        em["direct"].append(exact_match(tgt.answer(it["context"], it["question"], 16).text, it["answer"]))
    if len(nn_acc) <= 8:
        print(repr(g), "| gold", it["answer"], "| nn decode:", tgt.tok.decode(pred[-40:]), flush=True)
print(json.dumps({"layer": LAYER, "ntrain": NTRAIN, "nn_acc": sum(nn_acc)/len(nn_acc), "ans_acc": sum(ans_acc)/len(ans_acc), "ncorp": NCORP,
                  "em_latent": sum(em["latent"])/len(em["latent"]), "em_direct20": sum(em["direct"])/len(em["direct"]),
                  "seconds": round(time.time()-t0, 1)}))
