"""The aligned bridge's vocabulary projection: time and agreement of its nearest-row search settings.

    .venv/bin/python results/bridge/search_speed.py [--threads 2] [--items 60]

Real packets: the packaged bridge's mapped states of the first `--items` contexts of
results/bridge/val.jsonl and of four ~1024-token bench contexts (services.bench.make_items). For each
(search dtype, top_k): the median time of `project` on the first 256 and 1024 rows, and how far its
soft tokens are from the float32 top-64 projection (relative L2 error; share of tokens whose largest
weight lands on the same vocabulary row). Writes results/bridge/search_speed.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: results.timing
from results.timing import median_ms  # noqa: E402

import torch

HERE = Path(__file__).parent
SETTINGS = [("float32", 64), ("float32", 32), ("bfloat16", 64), ("bfloat16", 32), ("bfloat16", 16)]


def packets(n_items: int) -> torch.Tensor:
    from bridge.data import read_jsonl
    from bridge.load import default_weights_path, load_bridge
    from latentwire.runtime import AgentModel
    from services.bench import make_items

    source, bridge = AgentModel("smollm2-135m"), load_bridge(default_weights_path())
    pairs = [(i["context"], i["question"]) for i in read_jsonl(HERE / "val.jsonl", n_items)]
    pairs += make_items(4, 1024, seed=1)
    xs = []
    with torch.no_grad():
        for ctx, q in pairs:
            ids, span = source.source_prompt(ctx, q)
            xs.append(bridge.mapped(source.hidden_states(ids, bridge.cfg.source_layer)[span]))
    return torch.cat(xs)


def main() -> None:
    from bridge.load import default_weights_path, load_bridge
    from latentwire.runtime import cpu_amx

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = packets(args.items)
    bridge = load_bridge(default_weights_path(), search_dtype="float32")
    packaged_k = bridge.cfg.top_k
    bridge.cfg.top_k = 64
    rows = []
    with torch.no_grad():
        ref, _ = bridge.project(x)
        ref_top = bridge.nearest(x, 1)[1][:, 0]
        for dtype, k in SETTINGS:
            bridge.use_search_dtype(dtype)
            bridge.cfg.top_k = k
            out, _ = bridge.project(x)
            err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
            top = bridge.nearest(x, 1)[1][:, 0]
            row = {"search_dtype": dtype, "top_k": k,
                   "ms_256": median_ms(lambda: bridge.project(x[:256])),
                   "ms_1024": median_ms(lambda: bridge.project(x[:1024])),
                   "rel_error_max": float(err.max()), "rel_error_mean": float(err.mean()),
                   "same_nearest_row": float((top == ref_top).float().mean())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    amx = cpu_amx()
    report = {"command": f"results/bridge/search_speed.py --threads {args.threads} --items {args.items}",
              "tokens": int(x.shape[0]), "packaged_top_k": packaged_k, "vocab_rows": int(bridge.vocab.shape[0]),
              "hardware": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                           "amx": amx, "torch": torch.__version__},
              "reference": "float32 search, top_k 64 (the fitted bridge)", "settings": rows}
    (HERE / "search_speed.json").write_text(json.dumps(report, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['search_dtype']}\ntop {r['top_k']}" for r in rows]
    pos = range(len(rows))
    ax.bar([p - 0.2 for p in pos], [r["ms_256"] for r in rows], 0.4, label="256 tokens")
    ax.bar([p + 0.2 for p in pos], [r["ms_1024"] for r in rows], 0.4, label="1024 tokens")
    for p, r in zip(pos, rows):
        ax.annotate(f"err {r['rel_error_max']:.3f}", (p, r["ms_1024"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(pos), labels)
    ax.set_ylabel("project() ms (median of 5)")
    ax.set_title(f"aligned bridge projection, {args.threads} threads, AMX {'yes' if amx else 'no'} "
                 f"(err: max relative L2 vs float32 top 64)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "search_speed.png", dpi=110)
    print(f"wrote {HERE / 'search_speed.json'}")


if __name__ == "__main__":
    main()
