"""`latentwire models ...`: list profiles and prepare (convert once) the embedded models."""

from __future__ import annotations

import argparse
import json


def _list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from latentwire.profiles import PROFILES

    for p in PROFILES.values():
        d = asdict(p)
        print(json.dumps({k: d[k] for k in ("name", "family", "kind", "hf_id", "gguf_package", "source_layer")}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from latentwire import profiles

    for name in args.profiles:
        t0 = time.perf_counter()
        path = profiles.prepare(profiles.get_profile(name))
        print(f"{name}: {path or 'nothing to prepare'} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


def register(sub, group) -> None:
    models = group("models", "model profiles")
    p = models.add_parser("list", help="list the model profiles")
    p.set_defaults(func=_list)
    p = models.add_parser("prepare", help="convert GGUF profiles once to the safetensors cache")
    p.add_argument("profiles", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.set_defaults(func=_prepare)
