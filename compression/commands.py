"""`latentwire collect-trajectories`, `latentwire train sidecar`, `latentwire eval-cache`, `latentwire eval-session`."""

from __future__ import annotations

import argparse
import json
import sys

from latentwire.cli import add_job_options, add_seed_option, add_threads_option


def _setup(threads: int | None) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


def _collect(args: argparse.Namespace) -> int:
    from compression.trajectories import collect
    from latentwire import profiles

    _setup(args.threads)
    model, tok = profiles.load(args.model, device=args.device, dtype="float32")
    man = collect(model, tok, args.out, profile=args.model, n_samples=args.samples, length=args.length,
                  n_queries=args.queries, shard_size=args.shard_size, seed=args.seed)
    print(json.dumps({"out": args.out, "samples": man["samples"], "shards": len(man["shards"]),
                      "mean_loss": man["mean_loss"]}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from compression.train import TrainConfig, run
    from latentwire.cli import config_from_args

    cfg = config_from_args(TrainConfig, args, windows=[int(w) for w in str(args.window).split(",")],
                           proportional=args.attention == "proportional")
    options = ("num_workers", "use_gpu", "storage_path", "name", "out", "max_failures", "resume")
    result = run(cfg, **{k: getattr(args, k) for k in options if getattr(args, k) is not None})
    print(json.dumps(result, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from compression.evaluate import EvalConfig, check_spec, method_names, run

    try:  # before the model loads: the registry's names (compression.methods), keep=K on window methods only
        unknown = [m for m in args.methods.split(",") if not check_spec(m)]
    except ValueError as exc:
        print(f"latentwire eval-cache: error: {exc}", file=sys.stderr)
        return 2
    if unknown:
        print(f"latentwire eval-cache: error: unknown KV compression method {', '.join(map(repr, unknown))}; "
              f"known: {', '.join(method_names())}", file=sys.stderr)
        return 2
    _setup(args.threads)
    cfg = EvalConfig(model=args.model, ratios=[int(r) for r in args.ratios.split(",")], context=args.context,
                     ppl_tokens=args.ppl_tokens, facts=args.facts, sink=args.sink,
                     recent=args.recent, decode_tokens=args.decode_tokens, methods=args.methods.split(","),
                     weights=args.weights, timing_context=args.timing_context, window=args.window,
                     refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    if args.timing_only:  # add/refresh the long-context decode timing of an existing result file
        from pathlib import Path

        from compression.evaluate import all_goals, long_context_timing, plot
        from latentwire import profiles

        results = json.loads(Path(args.json).read_text())
        model, tok = profiles.load(args.model, dtype="float32")
        model.requires_grad_(False)  # as in run(): fmkvc_refine fits super-tokens only
        results["decode_long_context"] = long_context_timing(model, tok, cfg)
        results.update(all_goals(results, 8))
        Path(args.json).write_text(json.dumps(results, indent=2))
        if args.plot:
            plot(results, args.plot)
        return 0
    if args.replot:
        from pathlib import Path

        from compression.evaluate import all_goals, plot

        results = json.loads(Path(args.json).read_text())
        results.update(all_goals(results, 8))
        Path(args.json).write_text(json.dumps(results, indent=2))
        plot(results, args.plot)
        return 0
    run(cfg, json_out=args.json, plot_out=args.plot, resume=args.resume)
    return 0


def _eval_session(args: argparse.Namespace) -> int:
    import sys

    from compression.base import method_spec
    from compression.evaluate import method_names
    from compression.session_eval import SessionEvalConfig, run

    methods = args.methods.split(",")
    try:
        unknown = [m for m in methods if method_spec(m)[0] not in method_names()]
    except ValueError as exc:
        print(f"latentwire eval-session: error: {exc}", file=sys.stderr)
        return 2
    if unknown:  # before the model loads
        print(f"latentwire eval-session: error: unknown KV compression method {', '.join(map(repr, unknown))}; "
              f"known: {', '.join(method_names())}", file=sys.stderr)
        return 2
    if args.replot:
        from pathlib import Path

        from compression.session_eval import plot

        plot(json.loads(Path(args.json).read_text()), args.plot)
        return 0
    _setup(args.threads)
    cfg = SessionEvalConfig(model=args.model, methods=methods, sessions=args.sessions, turns=args.turns,
                            ratio=args.ratio, sink=args.sink, recent=args.recent, filler_tokens=args.filler_tokens,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, weights=args.weights,
                            asks=args.asks, probes=args.probes)
    res = run(cfg, json_out=args.json, plot_out=args.plot, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"json": args.json, "errors": res["errors"], **{
        name: {k: m.get(k) for k in ("recall", "recall_early", "probe_recall", "probe_recall_early", "kv_bytes_final",
                                     "kv_reduction", "turn_ms_p50", "tokens_final", "empty_answers")}
        for name, m in res["methods"].items()},
                      **{k: v for k, v in res.items() if k.startswith("goals_")}}, indent=1))
    return 0


def register(sub, group) -> None:
    p = sub.add_parser("collect-trajectories", help="record K/V windows, future queries and forces dL/dq (FMKVC)")
    p.add_argument("--model", required=True, help="model profile, e.g. smollm2-135m")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--length", type=int, default=384, help="tokens per text sample")
    p.add_argument("--queries", type=int, default=24, help="future query positions kept per sample")
    p.add_argument("--shard-size", type=int, default=8)
    add_seed_option(p, 0)
    add_threads_option(p, 1)
    p.add_argument("--device", default="cpu", help="where the frozen model runs (cpu, cuda)")
    p.set_defaults(func=_collect)

    tr = group("train", "training jobs (Ray Train)")
    p = tr.add_parser("sidecar", help="train the FMKVC sidecar on collected trajectories (Ray Train TorchTrainer)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="", help="trajectory directory from collect-trajectories (force matching)")
    p.add_argument("--init-weights", default="",
                   help="start from this sidecar (e.g. compression/weights/MODEL.safetensors) instead of a "
                        "random init; with --steps 0 the job only distills, without trajectories")
    p.add_argument("--window", default="4,8,16", help="window size W, or a comma list trained jointly")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-windows", type=int, default=1024, help="windows per step per worker")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", dest="n_blocks", type=int, default=2, help="sidecar transformer blocks")
    p.add_argument("--jac-weight", type=float, default=1.0)
    p.add_argument("--force-weight", type=float, default=1.0)
    p.add_argument("--value-norm", choices=["fixed", "bounded"], default="fixed",
                   help="super-token value norm: equal to the window's mean |v|, or at most that")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="after --steps of force matching: steps of end-to-end KL distillation through the frozen "
                        "model (compression/distill.py); loads the model in each worker")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-window", type=int, default=8, help="W of the compressed cache distilled through")
    p.add_argument("--recent", type=int, default=64, help="dense recent tokens of that cache")
    p.add_argument("--distill-context", type=int, default=768, help="context tokens per distillation document")
    p.add_argument("--distill-tokens", type=int, default=64, help="scored tokens after the context")
    p.add_argument("--distill-docs", type=int, default=48, help="distillation documents (2 more are held out)")
    p.add_argument("--attention", choices=["proportional", "plain"], default="proportional",
                   help="how the target reads super-tokens: with a log W mass bias (default) or as single tokens")
    add_job_options(p, out_help="final weights (default compression/weights/MODEL.safetensors)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-cache", help="FMKVC vs dense and kvpress baselines: perplexity, recall, bytes, speed")
    p.add_argument("--model", required=True)
    p.add_argument("--ratios", default="4,8,16")
    p.add_argument("--context", type=int, default=1024, help="context tokens")
    p.add_argument("--ppl-tokens", type=int, default=64, help="scored continuation tokens per document")
    p.add_argument("--facts", type=int, default=10, help="items (fact recall + continuation perplexity each)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--window", type=int, default=0,
                   help="window methods (fmkvc, mean_pool) use this W at every ratio and the longest recent window "
                        "within the ratio's budget (default: W = ratio, --recent)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--methods", default="dense,fmkvc,streamingllm,snapkv,knorm,expected_attention,mean_pool",
                   help="comma list of KV compression methods registered in compression.methods (an unknown "
                        "name is refused with the list), e.g. also kvzip, mean_pool_mass (ablation) and "
                        "fmkvc_refine (fmkvc with --refine-steps: super-tokens refitted at prefill); a window "
                        "method as NAME:keep=K keeps K exact entries per window of ratio x (K + 1) tokens and "
                        "pools the rest (the hybrid memory, same entries as NAME); NAME:keep=K:select=reconstruction "
                        "chooses those exact entries across the context and the layers by context reconstruction "
                        "(KVzip's scores, compression/reconstruction.py)")
    p.add_argument("--weights", default=None, help="sidecar weights (default: the packaged one)")
    p.add_argument("--refine-steps", type=int, default=30,
                   help="fmkvc_refine: steps fitting the super-tokens to the context's own tail (compression/refine.py)")
    p.add_argument("--refine-lr", type=float, default=3e-4, help="Adam step on the unit directions")
    p.add_argument("--timing-context", type=int, default=0,
                   help="also time decoding (dense vs fmkvc at 8x) after a context this long, e.g. 4096")
    p.add_argument("--timing-only", action="store_true", help="only (re)run that timing and update --json")
    p.add_argument("--resume", action="store_true", help="skip (method, ratio) cells already in --json")
    p.add_argument("--replot", action="store_true", help="only recompute goals and redraw --plot from --json")
    add_threads_option(p, 1)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default=None)
    p.set_defaults(func=_eval)

    p = sub.add_parser("eval-session", help="conversations of many turns: recall vs turn distance, KV bytes, "
                                            "per-turn latency of dense vs compressed session memory")
    p.add_argument("--model", default="gemma3-270m", help="target model profile")
    p.add_argument("--methods", default="dense,fmkvc,streamingllm,snapkv,knorm",
                   help="comma list: dense, window methods (fmkvc, mean_pool; NAME:keep=K keeps K exact entries "
                        "per window of ratio x (K + 1) tokens, the rest pooled; NAME:keep=K:select=reconstruction "
                        "chooses them over each turn by context reconstruction; NAME:sliding_layers=pool pools the "
                        "model's sliding-window layers, which by default keep their newest entries) and kvpress "
                        "scorer presses "
                        "(streamingllm, snapkv, knorm, expected_attention)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=32)
    p.add_argument("--ratio", type=int, default=8, help="window methods: W; pruning: the same entries per layer")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64, help="newest entries kept exact")
    p.add_argument("--filler-tokens", type=int, default=96, help="prose tokens around each turn's record")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--weights", default=None, help="fmkvc sidecar weights (default: the packaged one)")
    p.add_argument("--asks", choices=("current", "mixed"), default="current",
                   help="what each turn asks: its own record, or an earlier one half the time")
    p.add_argument("--probes", type=int, default=2,
                   help="questions about earlier records after each turn from the 4th, answered from a copy "
                        "of the session's cache that is then dropped (the first about one of the first 4 records)")
    add_seed_option(p, 0)
    add_threads_option(p, 1)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", action="store_true", help="only redraw --plot from --json (e.g. of a run cut short)")
    p.set_defaults(func=_eval_session)
