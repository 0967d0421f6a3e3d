"""How much batching can buy on this machine: each LATENT stage alone, at batch 1..16, in one process.

    .venv/bin/python results/bench/stage_scaling.py [--threads 2] [--context-tokens 256] [--batches 1,2,4,8,16]
        [--prefill-dtype auto|float32|bfloat16]

The serving code's own batched calls, without Ray or gRPC: the source's layer-L states
(`AgentModel.hidden_states_many`), the bridge (`BridgeServicer.translate_many`) and the target's
left-padded generation (`AgentModel.generate_batch`, 8 new tokens forced by a stop-free budget), on
bench contexts (`services.bench.make_items`). For each batch size: the wall time of the batch and per
request. A stage whose per-request time does not fall with the batch gains nothing from concurrency;
the ratio `ms per request at batch 1 / at batch B`, summed over stages, bounds what
`latentwire bench` can show as requests/s at concurrency B over concurrency 1 when every stage runs
on the same cores. Writes results/bench/stage_scaling_<context tokens>.json and .png (with a
`_float32`/`_bfloat16` suffix when --prefill-dtype is not auto, the agents' default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: results.timing
from results.timing import median_ms  # noqa: E402

import torch

HERE = Path(__file__).parent


def main() -> None:
    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services.bench import hardware, make_items
    from services.bridge_service import BridgeServicer

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the models' prompt forward, as the agents' prefill_dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    bridge = BridgeServicer({"threads": args.threads})
    layer = bridge.cfg.source_layer
    source = AgentModel(bridge.cfg.source_model, prefill_dtype=args.prefill_dtype)
    target = AgentModel(bridge.cfg.target_model, prefill_dtype=args.prefill_dtype)
    target.eos_ids = set()  # every row decodes the full budget: the same work at every batch size
    items = make_items(max(batches), args.context_tokens, seed=7)
    prompts = [source.source_prompt(c, q) for c, q in items]
    with torch.no_grad():
        hiddens = [wire(source.hidden_states(ids, layer)[span].float(), "bfloat16") for ids, span in prompts]
        softs = [wire(s, "bfloat16") for s in bridge.translate_many(hiddens)]
        embeds = [target.target_inputs(s, q)[0] for s, (_, q) in zip(softs, items)]

    rows = []
    for b in batches:
        stage = {
            "source": median_ms(lambda: source.hidden_states_many([(ids, layer) for ids, _ in prompts[:b]]), args.repeats),
            "bridge": median_ms(lambda: bridge.translate_many(hiddens[:b]), args.repeats),
        }
        gens = []
        stage["target"] = median_ms(lambda: gens.append(target.generate_batch(embeds[:b], [args.new_tokens] * b)),
                                args.repeats)
        last = gens[-1]
        row = {"batch": b, "ms": stage, "ms_per_request": {k: v / b for k, v in stage.items()},
               "target_prefill_ms": last[0].prefill_ms, "target_decode_ms": last[0].decode_ms}
        rows.append(row)
        print(json.dumps(row), flush=True)
    one = rows[0]["ms_per_request"]
    for r in rows:
        r["throughput_bound_vs_batch_1"] = sum(one.values()) / sum(r["ms_per_request"].values())
    report = {"command": f"results/bench/stage_scaling.py --threads {args.threads} --context-tokens "
                         f"{args.context_tokens} --batches {args.batches} --prefill-dtype {args.prefill_dtype}",
              "prefill_dtype": str(target.prefill_dtype).removeprefix("torch."),
              "hardware": hardware(), "context_tokens": args.context_tokens, "new_tokens": args.new_tokens,
              "prompt_tokens_target": [int(e.shape[0]) for e in embeds], "rows": rows}
    out = HERE / f"stage_scaling_{args.context_tokens}{'' if args.prefill_dtype == 'auto' else '_' + args.prefill_dtype}.json"
    out.write_text(json.dumps(report, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ("source", "bridge", "target"):
        ax.plot(batches, [r["ms_per_request"][k] for r in rows], marker="o", label=k)
    ax.plot(batches, [r["target_prefill_ms"] / r["batch"] for r in rows], "--", marker=".", label="target prefill")
    ax.plot(batches, [r["target_decode_ms"] / r["batch"] for r in rows], "--", marker=".", label="target decode")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per request")
    ax.set_title(f"LATENT stages alone, {args.context_tokens}-token contexts, {args.threads} threads, "
                 f"prefill {report['prefill_dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
