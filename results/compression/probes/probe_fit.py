"""Probe: query-aware closed-form refinement of super-tokens with the prefill's own queries.
Dense prefill (recording post-RoPE queries), then build the compressed cache by hand, then score the
continuation. SmolLM2 (all layers global)."""
import json, math, sys, time
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
torch.set_num_threads(2)
from compression.evaluate import fact_items
from compression.methods.fmkvc import load_sidecar
from compression.sidecar import default_weights_path
from latentwire import profiles

REC, BIAS, RECORD = {}, {}, [False]
def probe_sdpa(module, query, key, value, attention_mask, dropout=0.0, **kw):
    li = module.layer_idx
    if RECORD[0]:
        REC[li] = query.detach()
    b = BIAS.get(li)
    if b is not None:
        B, Hq, q_len, _ = query.shape
        kv_len = key.shape[-2]
        g = Hq // b.shape[1]
        bias = torch.zeros(b.shape[0], Hq, 1, kv_len)
        bias[..., :b.shape[-1]] = b.repeat_interleave(g, 1)[:, :, None]
        if attention_mask is None:
            qi = torch.arange(q_len)[:, None] + (kv_len - q_len)
            attention_mask = (torch.arange(kv_len)[None] <= qi)[None, None]
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask[..., :kv_len] + bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kw)
AttentionInterface.register("probe_sdpa", probe_sdpa)
AttentionMaskInterface.register("probe_sdpa", sdpa_mask)

name = sys.argv[1]; W = int(sys.argv[2]); recent = int(sys.argv[3]); R = int(sys.argv[4]) if len(sys.argv) > 4 else 64
methods = sys.argv[5].split(",") if len(sys.argv) > 5 else ["dense", "drop", "mean", "sc", "sc_b", "sc_bv", "ls_kbv", "mean_bv"]
model, tok = profiles.load(name, dtype="float32")
model.set_attn_implementation("probe_sdpa")
sc = load_sidecar(default_weights_path(name))
cfg = model.config
H = cfg.num_key_value_heads; Hq = cfg.num_attention_heads; g = Hq // H
scale = model.model.layers[0].self_attn.scaling
CONTEXT = int(__import__('os').environ.get('PROBE_CONTEXT', 768))  # probe_hybrid.py sets it
items = fact_items(tok, 5, CONTEXT, 64, 0)
sink = 4

def supertokens(method, li, K, V, Qall):
    # K,V (1,H,T,d); returns kt, vt (1,H,m,d), beta (1,H,m)
    T, d = K.shape[-2], K.shape[-1]
    m = (T - sink - recent) // W
    end = sink + m * W
    kw = K[:, :, sink:end].reshape(1, H, m, W, d); vw = V[:, :, sink:end].reshape(1, H, m, W, d)
    if method == "drop":
        return kw.mean(-2), vw.mean(-2), torch.full((1, H, m), -1e4), m
    if method.startswith("mean"):
        kt, vt = kw.mean(-2), vw.mean(-2)
        beta = torch.zeros(1, H, m)
    else:
        slot = (li * H + torch.arange(H)).repeat_interleave(m)
        with torch.no_grad():
            kt, vt = sc(kw.reshape(-1, W, d), vw.reshape(-1, W, d), slot)
        kt, vt = kt.reshape(1, H, m, d), vt.reshape(1, H, m, d)
        beta = torch.full((1, H, m), math.log(W))
    if method in ("mean", "sc"):
        return kt, vt, beta, m
    q = Qall[:, :, -R:].reshape(1, H, g * R, d)  # reference queries: the context's last R, per kv group
    s = torch.einsum("bhqd,bhmwd->bhmqw", q, kw) * scale
    L = torch.logsumexp(s, -1)  # (1,H,m,Q) window log-mass per query
    Z = torch.logsumexp(torch.einsum("bhqd,bhtd->bhqt", q, K) * scale, -1)  # query's full partition
    w = torch.softmax(L - Z[:, :, None], -1)  # weight queries by the window's attention share
    w = 0.9 * w + 0.1 / w.shape[-1]
    ow = torch.einsum("bhmqw,bhmwd->bhmqd", torch.softmax(s, -1), vw)
    if method.startswith("ls"):
        A = torch.cat([q * scale, torch.ones_like(q[..., :1])], -1)  # (1,H,Q,d+1)
        AtWA = torch.einsum("bhqi,bhmq,bhqj->bhmij", A, w, A)
        AtWL = torch.einsum("bhqi,bhmq,bhmq->bhmi", A, w, L)
        lam = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-2
        reg = lam * AtWA.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d + 1)
        reg[..., d, d] = 1e-6
        prior = torch.cat([kt, beta[..., None]], -1)
        sol = torch.linalg.solve(AtWA + reg, AtWL + torch.einsum("bhmij,bhmj->bhmi", reg, prior))
        kt, beta = sol[..., :d], sol[..., d]
    else:
        st = torch.einsum("bhqd,bhmd->bhmq", q, kt) * scale
        beta = (w * (L - st)).sum(-1)
    if method.endswith("v"):
        vt = torch.einsum("bhmq,bhmqd->bhmd", w, ow)
    return kt, vt, beta, m

def perplexity(compress_layer=None):
    """Dense prefill of each item (recording post-RoPE queries into REC), then compress_layer(li, layer)
    rewrites each layer's keys/values in place and returns its per-entry bias (or None); then score
    the continuation. Returns (perplexity, entries of layer 0)."""
    nll, n = 0.0, 0
    for it in items:
        ctx, cont = it["context"], it["continuation"]
        cache = DynamicCache(config=cfg)
        BIAS.clear(); RECORD[0] = True
        with torch.no_grad():
            last = model(input_ids=ctx[None], past_key_values=cache, position_ids=torch.arange(len(ctx))[None], logits_to_keep=1).logits[0, -1]
        RECORD[0] = False
        if compress_layer is not None:
            for li, layer in enumerate(cache.layers):
                b = compress_layer(li, layer)
                if b is not None:
                    BIAS[li] = b
        entries = cache.layers[0].keys.shape[-2]
        with torch.no_grad():
            logits = model(input_ids=cont[:-1][None], past_key_values=cache, position_ids=torch.arange(len(ctx), len(ctx) + len(cont) - 1)[None]).logits[0]
        logits = torch.cat([last[None], logits]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum")); n += len(cont)
    return math.exp(nll / n), entries


def fitted(method):
    def compress_layer(li, layer):
        K, V = layer.keys, layer.values
        kt, vt, beta, m = supertokens(method, li, K, V, REC[li])
        end = sink + m * W
        layer.keys = torch.cat([K[:, :, :sink], kt, K[:, :, end:]], 2)
        layer.values = torch.cat([V[:, :, :sink], vt, V[:, :, end:]], 2)
        b = torch.zeros(1, H, layer.keys.shape[-2]); b[:, :, sink:sink + m] = beta
        return b
    return compress_layer

res = {}
for method in methods:
    t0 = time.time()
    res[method] = perplexity(None if method == "dense" else fitted(method))[0]
    print(method, round(res[method], 3), f"{time.time()-t0:.0f}s", flush=True)
BIAS.clear()
print(json.dumps({"W": W, "recent": R, **res}))
