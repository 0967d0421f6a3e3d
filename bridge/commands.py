"""`latentwire bridge ...`, `latentwire train bridge`, `latentwire eval` subcommands."""

from __future__ import annotations

import argparse
import json


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from bridge.calibrate import calibrate
    from bridge.model import default_weights_path
    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    source, target = AgentModel(args.source), AgentModel(args.target)
    bridge = calibrate(source, target, layer=args.layer, num_queries=args.num_queries, n_texts=args.texts)
    out = args.out or default_weights_path()
    stats = {"target_embed_rms": target.embed_rms()}
    manifest = bridge.save(out, data={"calibration": f"pydoc_data.topics, {args.texts} chunks"},
                           metrics=stats, dtype=getattr(torch, args.dtype))
    print(json.dumps({"weights": str(out), "bridge_id": bridge.bridge_id, "sha256": manifest["sha256"]}))
    return 0


def register(sub, group) -> None:
    br = group("bridge", "bridge utilities")
    p = br.add_parser("calibrate", help="calibrate an untrained bridge's normaliser and output statistics")
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--target", default="gemma3-270m")
    p.add_argument("--layer", type=int, default=None, help="source layer (default: the profile's)")
    p.add_argument("--num-queries", type=int, default=32, help="K soft tokens")
    p.add_argument("--texts", type=int, default=48, help="offline text chunks to calibrate on")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored weight dtype")
    p.add_argument("--out", default=None, help="output .safetensors (default: the packaged bridge)")
    p.set_defaults(func=_calibrate)
