"""Force matching's held-out losses (W=8) for sidecars, mean pooling, and DROPPING the windows.

Dropping = the compressed span gets no attention at all (sink + dense tail only), emulated by
super-tokens with a -1e4 score bias. Compare with eval-cache, where dropping (StreamingLLM) wins:

    .venv/bin/python results/compression/heldout_losses_vs_drop.py data/fmkvc/smollm2-135m SIDECAR...
"""
import math, random, sys, torch
from compression.trajectories import iter_samples, read_manifest
from compression.train import make_batch, batch_loss, TrainConfig
from compression.sidecar import Sidecar, mean_pool
data, weights = sys.argv[1], sys.argv[2:]
info = read_manifest(data); cfg = TrainConfig()
n_shards = len(info["shards"])
samples = list(iter_samples(data, shard_ids=[n_shards - 1]))[:4]
gen = lambda: torch.Generator().manual_seed(1234)
for W in (8,):
    rows = {}
    for s in samples:
        b = make_batch(s, W, 4, info, None, random.Random(0))
        fns = {"mean_pool": lambda k, v, slot: mean_pool(k, v), **{w: Sidecar.load(w) for w in weights}}
        for name, fn in fns.items():
            with torch.no_grad():
                r = batch_loss(fn, b, cfg, info["scaling"], gen())
            for key in ("loss", "output", "jacobian", "force", "output_cosine", "mass_ratio"):
                rows.setdefault(name, {}).setdefault(key, []).append(float(r[key]))
        # drop: m = 0 windows -> coarse cache is sink + tail; emulate with super-tokens whose mass is 0
        from compression.losses import fmkvc_loss
        n, d = b["k"].shape[0], b["k"].shape[-1]
        with torch.no_grad():
            r = fmkvc_loss(b["q"], b["k"], b["v"], b["g"], b["f"], torch.zeros(n, b["m"], d), torch.zeros(n, b["m"], d),
                           b["qpos"], sink=4, end=b["end"], scale=info["scaling"], log_mass=-1e4, generator=gen())
        for key in ("loss", "output", "jacobian", "force", "output_cosine", "mass_ratio"):
            rows.setdefault("drop", {}).setdefault(key, []).append(float(r[key]))
    for name, r in rows.items():
        print(W, name, {k: round(sum(v) / len(v), 4) for k, v in r.items()})
