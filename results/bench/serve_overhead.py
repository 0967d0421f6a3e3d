"""Does serving slow the model compute down? The same LATENT asks through Ray Serve and gRPC, and
in this process, interleaved so that both see the same machine load.

    .venv/bin/python results/bench/serve_overhead.py [--config deploy/local.yaml] [--context-tokens 1024]
        [--items 4] [--repeats 3] [--threads 2]

Each round sends one ask to the local deployment (`AskReply.timings`: the replicas' own target
prefill, target decode and bridge times) and then runs the same stages in this process on the same
context: the source's layer-L states, `BridgeServicer.translate_many`, and the target's
`AgentModel.generate_batch`. Compared: the target's prefill and the bridge, the two largest LATENT
stages at long contexts (decode is left out: the served answer stops at its end). Writes
results/bench/serve_overhead_<context tokens>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def main() -> None:
    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services import local
    from services.bench import hardware, make_items
    from services.bridge_service import BridgeServicer
    from services.client import LatentWireClient

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads here (the replicas: their config)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = local.load_config(args.config)
    local.deploy(cfg)
    bridge = BridgeServicer({"threads": args.threads})
    layer = bridge.cfg.source_layer
    source = AgentModel(bridge.cfg.source_model, prefill_dtype="auto")
    target = AgentModel(bridge.cfg.target_model, prefill_dtype="auto")
    items = make_items(args.items, args.context_tokens, seed=7)
    rows = []
    try:
        with LatentWireClient(local.grpc_address(cfg)) as client, torch.no_grad():
            for rep in range(args.repeats):
                for i, (context, question) in enumerate(items):
                    reply = client.ask(context, question, "latent", max_new_tokens=8)
                    ids, span = source.source_prompt(context, question)
                    hidden = wire(source.hidden_states(ids, layer)[span].float(), "bfloat16")
                    t0 = time.perf_counter()
                    soft = wire(bridge.translate_many([hidden], [ids[span]])[0], "bfloat16")  # as served: with the token ids
                    bridge_ms = (time.perf_counter() - t0) * 1000
                    gen = target.generate_batch([target.target_inputs(soft, question)[0]], [1])[0]
                    t = reply.timings
                    row = {"round": rep, "item": i,
                           "served": {"target_prefill_ms": t.target_prefill_ms, "bridge_ms": t.bridge_ms},
                           "in_process": {"target_prefill_ms": gen.prefill_ms, "bridge_ms": bridge_ms}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        local.shutdown()

    def med(where, key):
        return statistics.median(r[where][key] for r in rows)

    summary = {k: {"served": med("served", k), "in_process": med("in_process", k)}
               for k in ("target_prefill_ms", "bridge_ms")}
    for s in summary.values():
        s["served_vs_in_process"] = s["served"] / s["in_process"]
    report = {"command": f"results/bench/serve_overhead.py --config {args.config} --context-tokens "
                         f"{args.context_tokens} --items {args.items} --repeats {args.repeats} --threads {args.threads}",
              "hardware": hardware(), "context_tokens": args.context_tokens, "median": summary, "rows": rows}
    out = HERE / f"serve_overhead_{args.context_tokens}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(summary)
    for j, where in enumerate(("served", "in_process")):
        ax.bar([k + j * 0.4 for k in range(len(keys))], [summary[k][where] for k in keys], width=0.4,
               label=where.replace("_", " "))
    ax.set_xticks([k + 0.2 for k in range(len(keys))], keys)
    ax.set_ylabel("median ms")
    ax.set_title(f"LATENT stages, served vs in process, {args.context_tokens}-token contexts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
