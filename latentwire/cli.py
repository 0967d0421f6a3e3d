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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
