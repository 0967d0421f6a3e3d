"""`latentwire` command line. Each area registers its own subcommands, imported lazily.

A module in COMMAND_MODULES defines `register(sub, group)`: `sub` is the top-level subparsers
object, `group(name, help)` returns the subparsers of a shared nested group such as
`latentwire train ...` or `latentwire bridge ...`. Parsers set `func=callable(args) -> int|None`.
Heavy imports (torch, ray, transformers) belong inside those callables so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = ["latentwire.commands", "services.commands", "bridge.commands", "compression.commands"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentwire", description="Latent-space agent-to-agent messaging on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}

    def group(name: str, help: str) -> argparse._SubParsersAction:
        if name not in groups:
            p = sub.add_parser(name, help=help)
            groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        return groups[name]

    for mod in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # the area's package itself is absent from this install
            found = False
        if found:
            importlib.import_module(mod).register(sub, group)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ConfigError (or an unknown registered name) is reported in one line, exit 2."""
    from latentwire.errors import ConfigError
    from latentwire.registry import UnknownKind

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UnknownKind) as err:
        command = " ".join(filter(None, [args.command, getattr(args, f"{args.command}_command", None)]))
        print(f"latentwire {command}: error: {err}", file=sys.stderr)
        return 2


# ---- options shared by several commands: one spelling, one meaning -------------------------
def add_seed_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument("--seed", type=int, default=default, help="random seed" + _default(default))


def add_threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help="torch intra-op threads (per worker in a training job)" + _default(default))


def add_job_options(p: argparse.ArgumentParser, out_help: str = "the exported weights (.safetensors)") -> None:
    """The options of every Ray Train job (`latentwire.jobs.launch`); None: the job's own default."""
    add_seed_option(p)
    add_threads_option(p)
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--max-failures", type=int, default=None, help="worker-group restarts from the last checkpoint")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train results and checkpoints (default ~/.cache/latentwire/ray-results)")
    p.add_argument("--name", default=None, help="run name; a rerun under the same name continues its last checkpoint")
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    p.add_argument("--out", default=None, help=out_help)


def _default(value) -> str:
    return f" (default {value})" if value is not None else ""


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """`cls` (a job config dataclass) from the options given (None: the dataclass default) and `fixed`."""
    given = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None}
    return cls(**{**given, **fixed})


if __name__ == "__main__":
    sys.exit(main())
