"""One-factor-at-a-time sweep of the Perceiver bridge's source layer and K (results/bridge/sweep.json).

    .venv/bin/python results/bridge/sweep.py --layers 12,18,24 --k 8,16,32 [--mode anchor|full]
        [--set anchor_steps=800 --set train_items=2400 ...]

mode "anchor": phase A alone (bridge-only answer anchoring on the cached source states, in-process,
minutes on a CPU): how well the packet carries the held-out answer entity. mode "full": short
complete `train bridge --arch perceiver` Ray Train jobs. `--set FIELD=VALUE` overrides any field of
`bridge.train.TrainConfig` for the base run. Records are appended to the JSON file after each run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from bridge.train import TrainConfig, anchor_accuracy, anchor_loss, anchor_phase, anchor_targets, prepare, run

HERE = Path(__file__).parent


@torch.no_grad()
def anchor_eval(bridge, target, h, lengths, items) -> dict:
    from bridge import cache
    from bridge.eval import soft_token_stats

    bridge.eval()
    hb, mask = cache.batch(h, lengths, list(range(len(items))))
    soft = bridge(hb, mask)
    e, ids, m = anchor_targets(target, items, soft.shape[1])
    return {"val_anchor_acc": anchor_accuracy(target, soft, ids, m),
            "val_anchor_loss": float(anchor_loss(soft, e, m, target.embed_rms())),
            **{f"val_{k}": v for k, v in soft_token_stats(soft, target.embed_rms()).items()}}


def anchor_probe(base: TrainConfig, layer: int, k: int, steps: int) -> dict:
    """Phase A alone for one (layer, K), in-process (bridge-only, no target forward)."""
    from bridge import cache
    from bridge.data import read_jsonl
    from bridge.perceiver import PerceiverBridge
    from latentwire.runtime import AgentModel

    torch.set_num_threads(base.threads)
    cfg = replace(base, layer=layer, num_queries=k, anchor_steps=steps)
    paths = prepare(cfg, progress=False)
    target = AgentModel(cfg.target)
    h, lengths, _ = cache.load_states(Path(paths["train_states"]))
    items = read_jsonl(paths["train_items"])
    vh, vl, _ = cache.load_states(Path(paths["val_states"]))
    val = read_jsonl(paths["val_items"])
    torch.manual_seed(cfg.seed)
    bridge = PerceiverBridge.load(paths["init"]).train()
    e, _, m = anchor_targets(target, items, k)
    t0 = time.time()
    anchor_phase(bridge, h, lengths, e, m, cfg, 0, 1, target.embed_rms(), "cpu")
    return {"mode": "anchor-only", "layer": layer, "num_queries": k, "anchor_steps": steps,
            "seconds": round(time.time() - t0, 1), **anchor_eval(bridge, target, vh, vl, val)}


def sweep(base: TrainConfig, layers: list[int], ks: list[int], out_json: str | None = None,
          mode: str = "anchor") -> list[dict]:
    """Each layer at the base K, then each K at the base layer, recorded as JSON (appending to earlier runs)."""
    from latentwire import profiles

    layer0 = base.layer or profiles.get_profile(base.source).source_layer
    k0 = base.num_queries
    prepare(replace(base, layer=layer0), layers=sorted(set(layers) | {layer0}))  # one source pass for all layers
    grid = [(layer, k0) for layer in layers] + [(layer0, k) for k in ks if k != k0]
    old = json.loads(Path(out_json).read_text())["runs"] if out_json and Path(out_json).exists() else []
    records = []
    for layer, k in dict.fromkeys(grid):
        if mode == "anchor":
            rec = anchor_probe(base, layer, k, base.anchor_steps)
        else:
            cfg = replace(base, layer=layer, num_queries=k, out=None, log_json=None, resume=None, name=None)
            s = run(cfg)
            rec = {"mode": "full", "layer": layer, "num_queries": k, "steps": s["steps"],
                   "anchor_steps": cfg.anchor_steps, "seconds": s["total_seconds"], **s["final_metrics"]}
        records.append(rec)
        print(json.dumps(rec))
        if out_json:
            Path(out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(out_json).write_text(json.dumps({"base": asdict(base), "runs": old + records}, indent=1))
    return records


def base_config(overrides: list[str]) -> TrainConfig:
    """TrainConfig with `FIELD=VALUE` overrides; VALUE is read as JSON (12, 0.5, true, null), else as a string."""
    names = {f.name for f in fields(TrainConfig)}
    kw = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"sweep.py: error: TrainConfig has no field {key!r}")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    return TrainConfig(**kw)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="", help="e.g. 12,18,24: one run per source layer (at the base K)")
    ap.add_argument("--k", default="", help="e.g. 8,16,32: one run per K (at the base layer)")
    ap.add_argument("--mode", default="anchor", choices=["anchor", "full"],
                    help="anchor: phase A only, in-process (minutes); full: short Ray Train jobs")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="base TrainConfig field")
    ap.add_argument("--json", default=str(HERE / "sweep.json"))
    args = ap.parse_args()
    sweep(base_config(args.set), ints(args.layers), ints(args.k), args.json, args.mode)


if __name__ == "__main__":
    main()
