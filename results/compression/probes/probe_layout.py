"""Probe layouts: drop-with-recent r, and the sidecar at W with recent r (SmolLM2, 5 items)."""
import math, sys, time, torch
sys.argv = sys.argv[:1] + ["smollm2-135m", "8", "64", "64", "dense"]
exec(open("results/compression/probes/probe_fit.py").read().split("res = {}")[0])
def run(method, W_, recent_):
    global W, recent
    W, recent = W_, recent_
    def compress_layer(li, layer):
        if method != "drop":
            return fitted(method)(li, layer)
        K, V = layer.keys, layer.values
        end = sink + (K.shape[-2] - sink - recent) // W * W
        layer.keys, layer.values = torch.cat([K[:, :, :sink], K[:, :, end:]], 2), torch.cat([V[:, :, :sink], V[:, :, end:]], 2)
    ppl, entries = perplexity(compress_layer)
    print(method, W_, recent_, "entries", entries, round(ppl, 3), flush=True)
for r in (64, 100, 124, 151):
    run("drop", 8, r)
for W_, r in ((32, 124), (16, 108), (32, 100), (24, 116)):
    run("sc", W_, r)
