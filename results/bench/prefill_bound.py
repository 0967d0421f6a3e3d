"""What bounds LATENT at long contexts on a CPU: the target's prefill of one soft token per context token.

    .venv/bin/python results/bench/prefill_bound.py [--context-tokens 1024] [--prompts 8] [--rounds 3]

1. Where one prefill's time goes (torch profiler, the agents' default prefill dtype): the share
   of matrix products, attention and the rest.
2. Whether the cores could prefill more prompts per second if each prompt got one thread instead of
   all: `--prompts` prefills one after another with 2 threads, then the same prompts split between
   2 processes of 1 thread that run at the same time (what two 1-thread target replicas would do),
   alternating, round after round (the machine's speed drifts by up to 2x within minutes).
Writes results/bench/prefill_bound_<context tokens>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def prompts(context_tokens: int, n: int, threads: int):
    """(target model, the target's input embeddings of n bench LATENT prompts)."""
    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services.bench import make_items
    from services.bridge_service import BridgeServicer

    torch.set_num_threads(threads)
    bridge = BridgeServicer({"threads": threads})
    source = AgentModel(bridge.cfg.source_model, prefill_dtype="auto")
    target = AgentModel(bridge.cfg.target_model, prefill_dtype="auto")
    embeds = []
    with torch.no_grad():
        for context, question in make_items(n, context_tokens, seed=7):
            ids, span = source.source_prompt(context, question)
            hidden = wire(source.hidden_states(ids, bridge.cfg.source_layer)[span].float(), "bfloat16")
            soft = wire(bridge.translate_many([hidden])[0], "bfloat16")
            embeds.append(target.target_inputs(soft, question)[0])
    return target, embeds


def prefill_all(target, embeds) -> float:
    t0 = time.perf_counter()
    for e in embeds:
        target.generate_batch([e], [1])
    return time.perf_counter() - t0


def _worker(context_tokens, n, part, inbox, out):
    target, embeds = prompts(context_tokens, n, threads=1)
    target.generate_batch([embeds[0]], [1])  # warm-up
    out.put("ready")
    while inbox.get() == "go":  # one round: this worker's half of the prompts
        out.put(prefill_all(target, embeds[part::2]))


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from services.bench import hardware

    ap = argparse.ArgumentParser()
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    target, embeds = prompts(args.context_tokens, args.prompts, threads=2)
    target.generate_batch([embeds[0]], [1])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen = target.generate_batch([embeds[0]], [1])[0]
    ops = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    total = sum(ops.values())
    groups = {"matrix products (aten::mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
              "attention (scaled_dot_product)": tuple(k for k in ops if "scaled_dot_product" in k)}
    shares = {g: sum(ops.get(k, 0.0) for k in keys) / total for g, keys in groups.items()}
    shares["everything else"] = 1 - sum(shares.values())
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:10])

    # the machine's speed drifts: alternate the two ways, round after round, on the same prompts
    ctx = mp.get_context("spawn")
    out, inboxes = ctx.Queue(), [ctx.Queue(), ctx.Queue()]
    procs = [ctx.Process(target=_worker, args=(args.context_tokens, args.prompts, p, inboxes[p], out))
             for p in (0, 1)]
    for p in procs:
        p.start()
    assert [out.get() for _ in procs] == ["ready", "ready"]
    sequential_s, side_by_side_s = [], []
    for _ in range(args.rounds):
        sequential_s.append(prefill_all(target, embeds))
        for q in inboxes:
            q.put("go")
        side_by_side_s.append(max(out.get() for _ in procs))  # until both halves are done
    for q in inboxes:
        q.put("stop")
    for p in procs:
        p.join()
    prefill_dtype = str(target.prefill_dtype).removeprefix("torch.")
    report = {
        "command": f"results/bench/prefill_bound.py --context-tokens {args.context_tokens} --prompts {args.prompts} "
                   f"--rounds {args.rounds}",
        "hardware": hardware(), "prefill_dtype": prefill_dtype,
        "prompt_tokens": int(embeds[0].shape[0]),
        "profile": {"prefill_ms": gen.prefill_ms, "self_cpu_ms_total": total, "shares": shares, "top_ops_ms": top},
        "throughput": {"prompts": args.prompts, "rounds": args.rounds,
                       "one_process_2_threads_s": sequential_s, "two_processes_1_thread_s": side_by_side_s,
                       "prompts_per_s_2_threads": args.prompts / statistics.median(sequential_s),
                       "prompts_per_s_two_1_thread": args.prompts / statistics.median(side_by_side_s),
                       "two_1_thread_vs_2_threads_per_round": [a / b for a, b in zip(sequential_s, side_by_side_s)]},
    }
    path = HERE / f"prefill_bound_{args.context_tokens}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("profile", "throughput")}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.pie(list(shares.values()), labels=[k.split(" (")[0] for k in shares], autopct="%.0f%%")
    a.set_title(f"one target prefill, {report['prompt_tokens']} tokens", fontsize=9)
    t = report["throughput"]
    b.bar(["1 process,\n2 threads", "2 processes,\n1 thread each"],
          [t["prompts_per_s_2_threads"], t["prompts_per_s_two_1_thread"]])
    b.set_ylabel("prompts / s")
    b.set_title("prefill throughput of the 2 cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
