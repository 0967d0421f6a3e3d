"""`latentwire bridge ...`, `latentwire train bridge`, `latentwire eval` subcommands."""

from __future__ import annotations

import argparse
import functools
import importlib
import json


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from bridge.calibrate import calibrate
    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    source, target = AgentModel(args.source), AgentModel(args.target)
    bridge = calibrate(source, target, layer=args.layer, num_queries=args.num_queries, n_texts=args.texts)
    out = args.out
    stats = {"target_embed_rms": target.embed_rms()}
    manifest = bridge.save(out, data={"calibration": f"pydoc_data.topics, {args.texts} chunks"},
                           metrics=stats, dtype=getattr(torch, args.dtype))
    print(json.dumps({"weights": str(out), "bridge_id": bridge.bridge_id, "sha256": manifest["sha256"]}))
    return 0


def _index(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from bridge import token_index as ti
    from bridge.data import generate
    from bridge.load import default_weights_path, load_bridge
    from latentwire.runtime import AgentModel
    from latentwire.textdata import text_chunks

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.bridge or default_weights_path()
    bridge = load_bridge(path, search_dtype="auto")
    if not bridge.supports_token_index():
        raise SystemExit(f"latentwire bridge index: error: {path} is a {bridge.arch} bridge, "
                         "which takes no token index")
    source = AgentModel(bridge.cfg.source_model, prefill_dtype="auto")
    # offline prose, and training-split fact contexts (names, numbers): never the held-out split
    texts = text_chunks(args.texts, min_chars=1500) + [
        " ".join(it["context"] for it in generate(8, "train", seed=s, wide=1.0)) for s in range(args.fact_texts)]
    offsets, rows, stats = ti.build(bridge, source, texts, per_row=args.per_row)
    out = args.out or ti.default_path(path)
    command = (f"latentwire bridge index --texts {args.texts} --fact-texts {args.fact_texts} --per-row {args.per_row}"
               + (f" --bridge {args.bridge}" if args.bridge else ""))
    man = ti.save(out, offsets, rows, bridge, data={"command": command, **stats})
    print(json.dumps({"index": str(out), "sha256": man["sha256"], **stats}))
    return 0


SWEEP_FLAGS = ("sweep_layers", "sweep_k", "sweep_json", "sweep_mode")


class _ArchChoices:
    """`--arch`'s choices: the bridge registry's names, read when argparse first needs them (the
    architecture modules import torch, which `latentwire --help` should not)."""

    def _names(self) -> list[str]:
        from bridge.load import BRIDGES

        return BRIDGES.names()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    """The job flags given on the command line, by field name."""
    return {k: v for k, v in vars(args).items() if k in flags and v is not None}


def _config(cls, args: argparse.Namespace, flags: dict[str, str], extra: tuple[str, ...] = ()):
    """A job config from the flags given; the embedded pair's bridge goes to the packaged path.

    A flag that is neither a field of `cls` nor one of `extra` is an error naming it: the chosen
    architecture would not read it."""
    from bridge.load import default_weights_path

    given = _given(args, flags)
    stray = [flags[k] for k in given if k not in cls.__dataclass_fields__ and k not in extra]
    if stray:
        raise SystemExit(f"latentwire train bridge: error: --arch {args.arch} does not take "
                         f"{', '.join(stray)}")
    cfg = cls(**{k: v for k, v in given.items() if k in cls.__dataclass_fields__})
    if cfg.out is None and cfg.source == "smollm2-135m" and cfg.target == "gemma3-270m":
        cfg.out = str(default_weights_path())
    return cfg


def _train(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """The training job of the architecture `--arch` names (its `train_job`, bridge/base.py)."""
    from transformers.utils import logging as hf_logging

    from bridge.load import BRIDGES

    hf_logging.disable_progress_bar()
    job = BRIDGES.get(args.arch).train_job
    module = importlib.import_module(job.module)
    cfg = _config(getattr(module, job.config), args, flags, SWEEP_FLAGS if job.sweep else ())
    if args.sweep_layers or args.sweep_k:
        ints = lambda s: [int(x) for x in s.split(",")] if s else []  # noqa: E731
        getattr(module, job.sweep)(cfg, ints(args.sweep_layers), ints(args.sweep_k),
                                   args.sweep_json or "results/bridge/sweep.json", args.sweep_mode or "anchor")
        return 0
    summary = module.run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.budgets:  # EM against the message budget (bridge/budgets.py)
        from bridge.budgets import run

        args.modes = args.modes or "latent,extract,text,direct,none"
        return run(args)
    from bridge.eval import run

    args.modes = args.modes or "latent,text,direct,none"
    return run(args)


def _eval_arguments(p) -> None:
    p.add_argument("--data", required=True, help="JSONL of {id, context, question, answer}")
    p.add_argument("--modes", default=None,
                   help="latent,text,direct,none (default); with --budgets also extract (all five by default)")
    p.add_argument("--bridge", default=None, help="bridge .safetensors (default: the packaged one)")
    p.add_argument("--source", default="smollm2-135m", help="source profile when no bridge is used")
    p.add_argument("--target", default="gemma3-270m", help="target profile when no bridge is used")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--message-tokens", type=int, default=64, help="text relay budget M")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--wire-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--search-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="an aligned bridge's nearest-row scoring, as the bridge service's search_dtype")
    p.add_argument("--token-index", default="auto",
                   help="an aligned bridge's token index, as the bridge service's token_index: auto, none or a path")
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the models' prompt forward, as the agents' prefill_dtype (AgentModel.use_prefill_dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--budgets", default=None,
                   help="message budgets M for LATENT and EXTRACT, e.g. 8,16,32,64,128,full: EM against the "
                        "budget (bridge/budgets.py) instead of one row per mode")
    p.add_argument("--text-budgets", default="64", help="with --budgets: budgets of the TEXT relay (it generates)")
    p.add_argument("--selector", default="lexical", help="with --budgets: packet selector (latentwire.selection)")
    p.add_argument("--selector-params", default=None, help='with --budgets: its parameters as JSON, e.g. {"after": 12}')
    p.add_argument("--max-context-tokens", type=int, default=8192, help="with --budgets: the models' context limit")
    p.add_argument("--plot", default=None, help="with --budgets: write the EM-vs-budget PNG here")


def register(sub, group) -> None:
    br = group("bridge", "bridge utilities")
    p = br.add_parser("calibrate", help="calibrate an untrained bridge's normaliser and output statistics")
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--target", default="gemma3-270m")
    p.add_argument("--layer", type=int, default=None, help="source layer (default: the profile's)")
    p.add_argument("--num-queries", type=int, default=32, help="K soft tokens")
    p.add_argument("--texts", type=int, default=48, help="offline text chunks to calibrate on")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored weight dtype")
    # required: an untrained bridge written to the packaged path would replace the trained one
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=_calibrate)

    p = br.add_parser("index", help="build an aligned bridge's token index (bridge/token_index.py)")
    p.add_argument("--bridge", default=None, help="aligned bridge .safetensors (default: the packaged one)")
    p.add_argument("--texts", type=int, default=400, help="offline text chunks (1500+ characters) to run")
    p.add_argument("--fact-texts", type=int, default=300, help="texts of 8 training-split fact contexts each")
    p.add_argument("--per-row", type=int, default=8, help="nearest vocabulary rows recorded per occurrence")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: X.index.safetensors beside the bridge X.safetensors")
    p.set_defaults(func=_index)

    tr = group("train", "Ray Train jobs")
    p = tr.add_parser("bridge", help="train a bridge as a Ray Train TorchTrainer job")
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--target", default="gemma3-270m")
    p.add_argument("--arch", default="aligned", choices=_ArchChoices(), metavar="ARCH",
                   help="a registered bridge architecture (bridge/base.py: BRIDGES). aligned: one soft "
                        "token per context token, a ridge fit (bridge/align.py, the packaged bridge); "
                        "perceiver: K learned queries, SGD on the target's loss (bridge/train.py). "
                        "A flag the architecture does not take is an error")
    p.add_argument("--layer", type=int, default=None, help="source layer (default: the profile's)")
    p.add_argument("--corpus-chunks", type=int, default=None, help="aligned: offline text chunks (default 300)")
    p.add_argument("--vocab-sequences", type=int, default=None,
                   help="aligned: random source-vocabulary sequences of 256 tokens (default 100)")
    p.add_argument("--ridge", type=float, default=None, help="aligned: L2 weight per 1000 rows (default 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="aligned: vocabulary softmax temperature (default 0.01)")
    p.add_argument("--chunk-units", type=int, default=None, help="aligned: work units per checkpoint")
    p.add_argument("--num-queries", type=int, default=None, help="perceiver: K soft tokens (default 16)")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, default=None, help="items per worker per step (default 8)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--div-weight", type=float, default=None, help="anti-collapse cosine penalty weight")
    p.add_argument("--rms-weight", type=float, default=None, help="RMS-matching penalty weight")
    p.add_argument("--anchor-steps", type=int, default=None, help="phase A steps (answer anchoring, no target)")
    p.add_argument("--anchor-weight", type=float, default=None, help="anchor term weight beside the LM loss")
    p.add_argument("--train-items", type=int, default=None)
    p.add_argument("--wide-vocab", type=float, default=None,
                   help="share of training names/cities/pets/rooms/years from the wide pool (0-1)")
    p.add_argument("--val-items", type=int, default=None, help="held-out items for periodic eval")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 2)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--max-failures", type=int, default=None)
    p.add_argument("--storage-path", default=None, help="Ray Train results/checkpoints directory")
    p.add_argument("--cache-dir", default=None, help="cached source states")
    p.add_argument("--name", default=None)
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    p.add_argument("--export", default=None, choices=["best", "last"],
                   help="which checkpoint becomes --out: lowest held-out answer NLL (default) or the last")
    p.add_argument("--out", default=None, help="final bridge .safetensors (default: packaged, for the embedded pair)")
    p.add_argument("--log-json", default=None, help="write a training summary JSON here")
    p.add_argument("--sweep-layers", default=None, help="e.g. 12,18,24: short runs per source layer")
    p.add_argument("--sweep-k", default=None, help="e.g. 8,16,32: short runs per K (at the base layer)")
    p.add_argument("--sweep-mode", default=None, choices=["anchor", "full"],
                   help="anchor (default): phase A only, in-process (minutes); full: short Ray Train jobs")
    p.add_argument("--sweep-json", default=None, help="default: results/bridge/sweep.json")
    # a job flag counts as given when it is not None: all default to None but --source and --target,
    # which every job takes; --arch picks the job
    flags = {a.dest: a.option_strings[-1] for a in p._actions if a.option_strings and a.dest not in ("help", "arch")}
    p.set_defaults(func=functools.partial(_train, flags=flags))

    p = sub.add_parser("eval", help="evaluate fact transfer per mode (latent, text, direct, none)")
    _eval_arguments(p)
    p.set_defaults(func=_eval)
