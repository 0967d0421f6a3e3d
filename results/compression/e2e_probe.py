"""Experiment (not part of the training job): fine-tune an FMKVC sidecar end to end on SmolLM2.

Loss: KL(dense || compressed) of the next-token distributions of 64 continuation tokens after a
768-token context, through the frozen model, with the context's cache compressed at W=8 by the sidecar
(proportional attention) and gradients flowing into the sidecar only. Recorded in sidecar_variants.json.

    .venv/bin/python results/compression/e2e_probe.py SIDECAR_IN OUT.safetensors STEPS [LR]
"""
import math, random, sys, time, torch
from transformers import DynamicCache
from compression import attention
from compression.cache import Schedule, compress_tail
from compression.presses import ProportionalDynamicLayer
from compression.sidecar import Sidecar
from compression.trajectories import token_samples
from latentwire import profiles

torch.set_num_threads(2)
src, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
W, SINK, RECENT, CTX, CONT = 8, 4, 64, 768, 64
model, tok = profiles.load("smollm2-135m", dtype="float32")
model.requires_grad_(False)
attention.enable(model)
sc = Sidecar.load(src); sc.train()
for p in sc.parameters(): p.requires_grad_(True)
opt = torch.optim.AdamW(sc.parameters(), lr=float(sys.argv[4]) if len(sys.argv) > 4 else 2e-4, weight_decay=0.01)
docs = token_samples(tok, 48, CTX + CONT)
sched = Schedule(W, SINK, RECENT)

def compressor(keys, values, layer_idx):
    b, h, m, w, d = keys.shape
    slot = (layer_idx * h + torch.arange(h)).repeat_interleave(m).repeat(b)
    kt, vt = sc(keys.reshape(-1, w, d), values.reshape(-1, w, d), slot)
    return kt.reshape(b, h, m, d), vt.reshape(b, h, m, d)

def student_cache(dense):
    cache = DynamicCache()
    for li, layer in enumerate(dense.layers):
        k, v, n_final, m = compress_tail(layer.keys, layer.values, 0, sched, compressor, li)
        cache.update(k, v, li)
        lay = cache.layers[li]
        lc = torch.zeros(k.shape[-2]); lc[n_final - m:n_final] = math.log(W)
        lay._fmkvc_log_count, lay._fmkvc_layer_idx = lc, li
        lay.__class__ = ProportionalDynamicLayer
    return cache

t0 = time.time()
for step in range(steps):
    ids = docs[step % len(docs)]
    ctx, cont = ids[:CTX], ids[CTX:]
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        model(ctx[None], past_key_values=dense, use_cache=True)
        teacher = model(cont[None], past_key_values=dense, position_ids=torch.arange(CTX, CTX + CONT)[None]).logits[0]
        dense.crop(CTX)
    logits = model(cont[None], past_key_values=student_cache(dense), position_ids=torch.arange(CTX, CTX + CONT)[None]).logits[0]
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
    opt.zero_grad(); kl.backward(); opt.step()
    if step % 10 == 0:
        print(f"step {step} kl {kl.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
sc.eval()
sc.save(out, data=sc.manifest.get("data"), metrics={"e2e_steps": steps})
