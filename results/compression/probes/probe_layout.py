"""Probe layouts: drop-with-recent r, and the sidecar at W with recent r (SmolLM2, 5 items)."""
import math, sys, time, torch
sys.argv = sys.argv[:1] + ["smollm2-135m", "8", "64", "64", "dense"]
exec(open("results/compression/probes/probe_fit.py").read().split("res = {}")[0])
def run(method, W_, recent_):
    global W, recent
    W, recent = W_, recent_
    nll, n = 0.0, 0
    for it in items:
        ctx, cont = it["context"], it["continuation"]
        cache = DynamicCache(config=cfg); BIAS.clear(); RECORD[0] = True
        with torch.no_grad():
            last = model(input_ids=ctx[None], past_key_values=cache, position_ids=torch.arange(len(ctx))[None], logits_to_keep=1).logits[0, -1]
        RECORD[0] = False
        for li, layer in enumerate(cache.layers):
            K, V = layer.keys, layer.values
            kt, vt, beta, m = supertokens(method, li, K, V, REC[li])
            end = sink + m * W
            if method == "drop":
                layer.keys = torch.cat([K[:, :, :sink], K[:, :, end:]], 2); layer.values = torch.cat([V[:, :, :sink], V[:, :, end:]], 2)
                continue
            layer.keys = torch.cat([K[:, :, :sink], kt, K[:, :, end:]], 2); layer.values = torch.cat([V[:, :, :sink], vt, V[:, :, end:]], 2)
            b = torch.zeros(1, H, layer.keys.shape[-2]); b[:, :, sink:sink + m] = beta; BIAS[li] = b
        entries = cache.layers[0].keys.shape[-2]
        with torch.no_grad():
            logits = model(input_ids=cont[:-1][None], past_key_values=cache, position_ids=torch.arange(len(ctx), len(ctx) + len(cont) - 1)[None]).logits[0]
        logits = torch.cat([last[None], logits]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum")); n += len(cont)
    print(method, W_, recent_, "entries", entries, round(math.exp(nll / n), 3), flush=True)
for r in (64, 100, 124, 151):
    run("drop", 8, r)
for W_, r in ((32, 124), (16, 108), (32, 100), (24, 116)):
    run("sc", W_, r)
