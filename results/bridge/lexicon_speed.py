"""What the bridge's lexicon costs a packet: `translate_many` with and without it, side by side.

    .venv/bin/python results/bridge/lexicon_speed.py [--context-tokens 256,1024] [--rounds 10]

One bench context per size (`services.bench.make_items`, seed 5), the packaged bridge with its token
index, the packet's source token ids given both times; the lexicon is taken off and put back between
calls, alternating which goes first. Writes results/bridge/lexicon_speed.json.
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
    from transformers.utils import logging as hf_logging

    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services.bench import hardware, make_items
    from services.bridge_service import BridgeServicer

    ap = argparse.ArgumentParser()
    ap.add_argument("--context-tokens", default="256,1024")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    svc = BridgeServicer({"threads": args.threads})
    source = AgentModel(svc.cfg.source_model)
    bridge = svc.bridge
    lexicon = bridge.lexicon()
    none = {k: v[:0] for k, v in lexicon.items()}
    report = {"command": f"results/bridge/lexicon_speed.py --context-tokens {args.context_tokens} "
                         f"--rounds {args.rounds} --threads {args.threads}", "hardware": hardware(),
              "lexicon_tokens": len(lexicon["lexicon_tokens"]), "packets": []}
    for n in (int(c) for c in args.context_tokens.split(",")):
        context, question = make_items(1, n, seed=5)[0]
        ids, span = source.source_prompt(context, question)
        hidden = wire(source.hidden_states(ids, svc.cfg.source_layer)[span].float(), "bfloat16")
        ms = {"with": [], "without": []}
        for r in range(args.rounds):
            for name in ("with", "without") if r % 2 == 0 else ("without", "with"):
                bridge.set_lexicon(*(lexicon if name == "with" else none).values())
                t0 = time.perf_counter()
                svc.translate_many([hidden], [ids[span]])
                ms[name].append((time.perf_counter() - t0) * 1000)
        row = {"rows": len(hidden), **{f"median_ms_{k}_lexicon": round(statistics.median(v), 1) for k, v in ms.items()}}
        report["packets"].append(row)
        print(json.dumps(row), flush=True)
    bridge.set_lexicon(*lexicon.values())
    (HERE / "lexicon_speed.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
