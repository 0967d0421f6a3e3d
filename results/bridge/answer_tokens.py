"""Where the bridge sends the tokens of each bench item's planted answer.

    .venv/bin/python results/bridge/answer_tokens.py [--items 9] [--context-tokens 256,1024]

For the bench items (`services.bench.bench_items`, the bench's seeds), the answer's source tokens,
and the target vocabulary row nearest each of their soft tokens: with the token index and with the
whole-vocabulary search. A row that is not the answer's own piece of text is a mistranslation the
target cannot undo. Writes results/bridge/answer_tokens.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).parent


def main() -> None:
    from transformers.utils import logging as hf_logging

    from bridge import token_index as ti
    from bridge.load import default_weights_path, load_bridge
    from latentwire.codec import wire
    from latentwire.runtime import AgentModel
    from services.bench import bench_items, hardware

    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=9)
    ap.add_argument("--context-tokens", default="256,1024")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    bridge = load_bridge(default_weights_path(), search_dtype="auto")
    index = ti.load(ti.default_path(default_weights_path()), bridge)
    source = AgentModel(bridge.cfg.source_model)
    target = AgentModel(bridge.cfg.target_model)
    table = target.embed.weight.detach()

    def nearest(x: torch.Tensor) -> list[str]:
        return target.tok.convert_ids_to_tokens(torch.cdist(x, table).argmin(-1).tolist())

    rows = []
    for ctx in (int(c) for c in args.context_tokens.split(",")):
        for it in bench_items(args.items, ctx, seed=ctx):
            ids, span = source.source_prompt(it.context, it.question)
            text, (c0, _) = source.source_text(it.context, it.question)
            enc = source.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            a0 = text.find(it.answer, c0)
            a1 = a0 + len(it.answer)
            # packet row k is prompt token span.start + k
            pos = [i - span.start for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < a1 and b > a0]
            with torch.no_grad():
                h = wire(source.hidden_states(ids, bridge.cfg.source_layer)[span].float(), "bfloat16")
                bridge.use_token_index(None, None)
                full = bridge(h[None])[0]
                bridge.use_token_index(*index)
                fast = bridge(h[None], token_ids=ids[span][None])[0]
            src = source.tok.convert_ids_to_tokens(ids[span][pos].tolist())
            row = {"context_tokens": ctx, "answer": it.answer, "source_tokens": src,
                   "nearest_whole_vocabulary": nearest(full[pos]), "nearest_token_index": nearest(fast[pos])}
            # the same piece of text: the source's space marker is "Ġ", the target's "▁"
            row["kept"] = [s.replace("Ġ", "▁") == t for s, t in zip(src, row["nearest_token_index"])]
            rows.append(row)
            print(ctx, it.answer, "|", " ".join(src), "->", " ".join(row["nearest_token_index"]), flush=True)
    kept = [k for r in rows for k in r["kept"]]
    report = {"command": f"results/bridge/answer_tokens.py --items {args.items} --context-tokens "
                         f"{args.context_tokens} --threads {args.threads}", "hardware": hardware(),
              "answer_tokens_kept": sum(kept) / len(kept),
              "answers_all_kept": sum(all(r["kept"]) for r in rows) / len(rows), "items": rows}
    (HERE / "answer_tokens.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("answer_tokens_kept", "answers_all_kept")}))


if __name__ == "__main__":
    main()
