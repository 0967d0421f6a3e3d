"""`latentwire bridge ...`, `latentwire train bridge`, `latentwire eval` subcommands."""

from __future__ import annotations

import argparse
import importlib
import json

from latentwire.cli import add_job_options, add_threads_option, config_from_args
from latentwire.errors import ConfigError


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
        raise ConfigError(f"{path} is a {bridge.arch} bridge, which takes no token index")
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


NOT_CONFIG = {"command", "train_command", "func", "arch"}  # parsed, but not fields of a job config


def _config(cls, args: argparse.Namespace):
    """A job config from the options given; the embedded pair's bridge goes to the packaged path.
    An option the chosen architecture's job does not take is refused, not dropped."""
    from bridge.load import default_weights_path

    foreign = sorted(k for k, v in vars(args).items()
                     if v is not None and k not in NOT_CONFIG and k not in cls.__dataclass_fields__)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ConfigError(f"--arch {args.arch} takes no {flags}")
    cfg = config_from_args(cls, args)
    if cfg.out is None and cfg.source == "smollm2-135m" and cfg.target == "gemma3-270m":
        cfg.out = str(default_weights_path())
    return cfg


def _train(args: argparse.Namespace) -> int:
    """The training job of the architecture `--arch` names (its `train_job`, bridge/base.py)."""
    from transformers.utils import logging as hf_logging

    from bridge.load import BRIDGES
    from latentwire.jobs import TRAIN_JOBS

    hf_logging.disable_progress_bar()
    ref = BRIDGES.get(args.arch).train_job
    importlib.import_module(ref.module)  # registers the job
    job = TRAIN_JOBS.get(ref.name)
    summary = job.run(_config(job.config, args))
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
    p.add_argument("--message-tokens", type=int, default=64, help="the message budget M of TEXT and LATENT")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--wire-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "int8"])
    p.add_argument("--search-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="an aligned bridge's nearest-row scoring, as the bridge service's search_dtype")
    p.add_argument("--token-index", default="auto",
                   help="an aligned bridge's token index, as the bridge service's token_index: auto, none or a path")
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the models' prompt forward, as the agents' prefill_dtype (AgentModel.use_prefill_dtype)")
    add_threads_option(p)
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--budgets", default=None,
                   help="message budgets M for LATENT and EXTRACT, e.g. 8,16,32,64,128,full: EM against the "
                        "budget (bridge/budgets.py) instead of one row per mode")
    p.add_argument("--text-budgets", default="64", help="with --budgets: budgets of the TEXT relay (it generates)")
    p.add_argument("--selector", default="lexical", help="with --budgets: packet selector (latentwire.selection)")
    p.add_argument("--selector-params", default=None, help='with --budgets: its parameters as JSON, e.g. {"after": 12}')
    p.add_argument("--latent-selectors", default="",
                   help="with --budgets: more selectors whose LATENT packets are scored on the same read, as modes "
                        "latent-<spec>@M; a spec is a name or name:key=value;key=value (e.g. merge,merge:left=0: "
                        "latentwire.merging)")
    p.add_argument("--max-context-tokens", type=int, default=8192, help="with --budgets: the models' context limit")
    p.add_argument("--plot", default=None, help="with --budgets: write the EM-vs-budget PNG here")
    p.add_argument("--no-nll", action="store_true",
                   help="with --budgets: skip the answer NLL (a second target forward per payload)")


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
    add_threads_option(p)
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
    p.add_argument("--cache-dir", default=None, help="cached source states")
    p.add_argument("--export", default=None, choices=["best", "last"],
                   help="which checkpoint becomes --out: lowest held-out answer NLL (default) or the last")
    p.add_argument("--log-json", default=None, help="write a training summary JSON here")
    add_job_options(p, out_help="final bridge .safetensors (default: packaged, for the embedded pair)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate fact transfer per mode (latent, text, direct, none)")
    _eval_arguments(p)
    p.set_defaults(func=_eval)
