"""Which merged slots the target can read: the probe on training items that chose the `merge` rule.

On the first 8 plain and 8 look-alike training items (`train_700_*.jsonl`) at M = 16, EM of LATENT
packets of M slots built four ways from the same read of each item:
- `lexical`: one token per slot (today's LATENT),
- `pairs`: `lexical`'s 2M tokens, every two adjacent tokens of a run in one slot, half and half,
- `light+anchors`: light tokens merged (`latentwire.merging.pair_slots`), the freed slots given to
  more anchors (`lexical`'s windows of 12 tokens at a larger token budget),
- `light+windows`: the same merges, the freed slots given to longer windows (the `merge` selector).

    PYTHONPATH=$PWD .venv/bin/python results/budget/merge_probe.py > results/budget/merge_probe.txt
"""

import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from bridge.data import read_jsonl  # noqa: E402
from bridge.eval import exact_match  # noqa: E402
from bridge.load import default_weights_path, load_bridge  # noqa: E402
from latentwire.codec import wire  # noqa: E402
from latentwire.merging import merge_slots, pair_slots  # noqa: E402
from latentwire.runtime import AgentModel  # noqa: E402
from latentwire.selection import SourceView, keep_tokens, make_selector, windows  # noqa: E402

M = 16
HERE = Path(__file__).parent


def slots_tensor(slots):
    return torch.tensor([s for s, g in enumerate(slots) for _ in g]), torch.tensor(
        [1.0 / len(g) for g in slots for _ in g])


def main() -> None:
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    items = read_jsonl(HERE / "train_700_plain.jsonl", 8) + read_jsonl(HERE / "train_700_lookalike.jsonl", 8)
    bridge = load_bridge(default_weights_path(), search_dtype="auto", token_index="auto")
    target, source = AgentModel(bridge.cfg.target_model), AgentModel(bridge.cfg.source_model)
    lexical, merge = make_selector("lexical"), make_selector("merge")
    right = {k: 0 for k in ("lexical", "pairs", "light+anchors", "light+windows")}
    for it in items:
        prompt = source.source_spans(it["context"], it["question"])
        ids, span, asked = prompt
        states = source.hidden_states(ids, bridge.cfg.source_layer)
        view = SourceView(ids=ids, context=span, question=asked, question_text=it["question"],
                          tokens=source.tok.convert_ids_to_tokens(ids[span].tolist()))
        scores = lexical.score(view)

        def packet(keep, slots):
            pos = torch.tensor(keep) + span.start
            soft = bridge(wire(states[pos].float(), "bfloat16")[None], token_ids=ids[pos][None])[0]
            return wire(merge_slots(soft, *slots_tensor(slots)), "bfloat16")

        def fit(after):  # the most tokens whose light merges fill at most M slots
            for b in range(2 * M, M - 1, -1):
                keep = windows(scores, b, lexical.before, after(b))
                slots = pair_slots([view.tokens[p] for p in keep], keep)
                if len(slots) <= M:
                    return keep, slots

        keep = lexical.select(view, M)
        pairs_keep = lexical.select(view, 2 * M)
        pair_groups, i = [], 0
        while i < len(pairs_keep):  # adjacent pairs within runs
            if i + 1 < len(pairs_keep) and pairs_keep[i + 1] == pairs_keep[i] + 1:
                pair_groups.append([i, i + 1])
                i += 2
            else:
                pair_groups.append([i])
                i += 1
        pair_groups = pair_groups[:M]
        pairs_keep = pairs_keep[:sum(len(g) for g in pair_groups)]
        longer = fit(lambda b: round(lexical.after * b / M))
        msg = keep_tokens(source, prompt, it["question"], M, merge, None, states)  # the selector plans the same
        assert msg.num_slots <= M and msg.positions.tolist() == [p + span.start for p in longer[0]]
        payloads = {"lexical": packet(keep, [[i] for i in range(len(keep))]),
                    "pairs": packet(pairs_keep, pair_groups),
                    "light+anchors": packet(*fit(lambda b: lexical.after)),
                    "light+windows": packet(*longer)}
        row = {}
        for name, soft in payloads.items():
            assert len(soft) <= M
            text = target.answer(soft, it["question"], 10).text
            row[name] = exact_match(text, it["answer"])
            right[name] += int(row[name])
        print(it["id"], repr(it["answer"]), row, flush=True)
    print(f"M = {M}, {len(items)} training items, right: {right}")


if __name__ == "__main__":
    main()
