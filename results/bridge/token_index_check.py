"""The packaged token index against the whole-vocabulary search, row by row.

    .venv/bin/python results/bridge/token_index_check.py [--bench-items 8] [--val-items 300]

On bench contexts of 1024 tokens (`services.bench.make_items`, seed 11) and held-out fact contexts
(results/bridge/val.jsonl): for every packet row, whether the index finds the row's nearest
vocabulary row, how many rows the index lists, how far each soft token moves (relative L2), and
the bridge's time both ways. Prints JSON; writes results/bridge/token_index_check.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def main() -> None:
    from transformers.utils import logging as hf_logging

    from bridge import token_index as ti
    from bridge.load import default_weights_path, load_bridge
    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services.bench import hardware, make_items

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-items", type=int, default=8)
    ap.add_argument("--val-items", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    bridge = load_bridge(default_weights_path(), search_dtype="auto")
    index = ti.load(ti.default_path(default_weights_path()), bridge)
    source = AgentModel(bridge.cfg.source_model, prefill_dtype="auto")
    val = [json.loads(line) for line in open(HERE / "val.jsonl")][: args.val_items]
    sets = {"bench_1024": [c for c, _ in make_items(args.bench_items, 1024, seed=11)],
            "val": [v["context"] for v in val]}
    report = {"command": f"results/bridge/token_index_check.py --bench-items {args.bench_items} "
                         f"--val-items {args.val_items} --threads {args.threads}", "hardware": hardware()}
    with torch.no_grad():
        for name, contexts in sets.items():
            rows = same = listed = 0
            moved, t_full, t_index = [], 0.0, 0.0
            for context in contexts:
                ids, span = source.source_prompt(context, "What?")
                tok = ids[span]
                h = wire(source.hidden_states(ids, bridge.cfg.source_layer)[span].float(), "bfloat16")
                x = bridge.mapped(h)
                bridge.use_token_index(None, None)
                t0 = time.perf_counter()
                full = bridge(h[None])[0]
                t_full += time.perf_counter() - t0
                nearest = bridge.nearest(x, 1)[1][:, 0]
                bridge.use_token_index(*index)
                t0 = time.perf_counter()
                fast = bridge(h[None], token_ids=tok[None])[0]
                t_index += time.perf_counter() - t0
                found = bridge._near_rows(x, 1, tok)[1][:, 0]
                rows += len(tok)
                same += int((found == nearest).sum())
                offsets = index[0]
                listed += int((offsets[tok + 1] > offsets[tok]).sum())
                moved.append((full - fast).norm(dim=-1) / full.norm(dim=-1))
            moved = torch.cat(moved)
            report[name] = {"contexts": len(contexts), "rows": rows, "nearest_row_found": same / rows,
                            "rows_listed": listed / rows,
                            "soft_token_relative_change": {"median": float(moved.median()),
                                                           "p99": float(moved.quantile(0.99)),
                                                           "max": float(moved.max()),
                                                           "share_above_1pct": float((moved > 0.01).float().mean())},
                            "bridge_s_full_search": round(t_full, 3), "bridge_s_token_index": round(t_index, 3)}
    (HERE / "token_index_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
