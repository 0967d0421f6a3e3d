"""Profile the latent hot path in one process (no Ray, no network): where does non-model time go?

`python -m services.profile_path [--requests N] [--html OUT]` runs the same functions the services
run for a LATENT request (tokenise + source forward to layer L, packet encode/decode on both hops,
bridge, target prefill + decode) under pyinstrument, and prints the time per stage and the share
of everything that is not a model forward.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--html", default=None, help="also write pyinstrument's HTML report here")
    args = ap.parse_args(argv)

    import torch
    from pyinstrument import Profiler
    from transformers.utils import logging as hf_logging

    from bridge.load import default_weights_path, load_bridge
    from latentwire import codec
    from latentwire.runtime import AgentModel
    from latentwire.settings import AgentSettings, BridgeSettings
    from protos.latentwire.v1 import latentwire_pb2 as pb
    from services.bench import make_items

    hf_logging.disable_progress_bar()
    prefill = AgentSettings.model_fields["prefill_dtype"].default  # as served
    src, tgt = AgentModel(args.source, prefill_dtype=prefill), AgentModel(args.target, prefill_dtype=prefill)
    bridge = load_bridge(default_weights_path(), search_dtype=BridgeSettings().search_dtype,
                         token_index=BridgeSettings().token_index)  # as served
    items = make_items(args.requests + 1, 256)
    stages: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        stages[name] = stages.get(name, 0.0) + (time.perf_counter() - t) * 1000
        return out

    def one(context, question):
        ids, span = timed("tokenize_source", src.source_prompt, context, question)
        h = timed("source_forward", src.hidden_states, ids, bridge.cfg.source_layer)[span]
        wire = timed("codec", lambda: pb.HiddenStatePacket(hidden=codec.encode(h), source_token_ids=ids[span].tolist())
                     .SerializeToString())
        packet = timed("codec", lambda: pb.HiddenStatePacket.FromString(wire))
        hidden = timed("codec", lambda: codec.decode(packet.hidden, ndim=2))
        tok = torch.tensor(packet.source_token_ids)[None]
        with torch.no_grad():
            soft = timed("bridge", lambda: bridge(hidden[None], token_ids=tok)[0])
        wire = timed("codec", lambda: pb.LatentPacket(soft_tokens=codec.encode(soft)).SerializeToString())
        soft = timed("codec", lambda: codec.decode(pb.LatentPacket.FromString(wire).soft_tokens, ndim=2))
        embeds = timed("target_inputs", lambda: tgt.target_inputs(soft, question))
        gen = timed("target_generate", tgt.generate, embeds, args.max_new_tokens)
        stages["target_prefill(model)"] = stages.get("target_prefill(model)", 0.0) + gen.prefill_ms
        stages["target_decode(model)"] = stages.get("target_decode(model)", 0.0) + gen.decode_ms

    one(*items[0])  # warm-up
    stages.clear()
    profiler = Profiler(interval=0.001)
    with profiler:
        for context, question in items[1:]:
            one(context, question)
    total = sum(v for k, v in stages.items() if "(model)" not in k)
    per = {k: v / args.requests for k, v in stages.items()}
    model = per["source_forward"] + per["bridge"] + per["target_generate"]
    print(profiler.output_text(unicode=False, color=False, show_all=False)[:6000])
    print(json.dumps({"ms_per_request": per, "total_ms": total / args.requests,
                      "codec_share": per["codec"] / (total / args.requests),
                      "non_model_share": 1 - model / (total / args.requests)}, indent=1))
    if args.html:
        with open(args.html, "w") as f:
            f.write(profiler.output_html())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
