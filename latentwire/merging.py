"""Slots that carry more than one context token: the `merge` packet selector.

A LATENT slot is a soft token in the target's embedding simplex (`bridge/aligned.py`: a convex
combination of the target's embedding rows). A convex combination of two soft tokens is still in
that simplex, so one slot can carry two adjacent context tokens at once, which a text message
cannot: M slots then cover more than M context tokens.

What the target of the embedded pair can read of such slots decides how they are spent. Merging
every adjacent pair half and half (a bigram per slot) left it unable to answer anything (0 of 16
training items at M = 16, against 11 of 16 with one token per slot): an answer is copied token by
token, and a blend of two tokens is read as neither. So this selector merges only where little is
lost: a *light* token (a lower-case stop word or punctuation) shares a slot with its neighbour in
the same run of context, unless either of the two spells a digit, a capitalised word (names,
places, months) or is a bare space piece (which starts a number: "Ġ" + "2"). The slots this frees
go to more of the same records: the token budget rises from M until the merged message fills M
slots, and each anchor's window grows with it (`after` x tokens / M). Giving them to more anchors
instead brought in more look-alike records (9 of the 16 training items against 11 of 16 with
longer windows, `results/budget/train_700_*.jsonl`, M = 16).

Scoring and windows are `lexical`'s; `Message.slot_of` / `slot_weight` say which slot each kept
token goes to and with what weight (a slot's weights sum to 1), and `merge_slots` turns the
bridge's per-token soft tokens into the message's slots. A served source sends the groups with the
hidden states (`HiddenStatePacket.slot_of`, `slot_weight`) and the bridge service merges before it
signs the packet; an agent picks the selector with `selection: {method: merge}`. EXTRACT has no
slots: a text message of this selector is `lexical`'s M tokens. `latentwire eval --budgets
--latent-selectors merge` scores it beside today's LATENT and EXTRACT on the same read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from latentwire.selection import _STOP, SELECTORS, LexicalSelector, SourceView, windows


def _text(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip()


def light(token: str) -> bool:
    """A token whose meaning survives sharing a slot: punctuation or a lower-case stop word. Never a
    digit (numbers are spelt digit by digit and copied exactly), never an empty (space) piece."""
    w = _text(token)
    if not w or re.search(r"[0-9]", w):
        return False
    return not re.search(r"[A-Za-z]", w) or (w.islower() and w in _STOP)


def heavy(token: str) -> bool:
    """A token that must keep its own slot: digits, a capitalised piece, or a space piece (which
    prefixes a digit in byte-level tokenizers: "Ġ" + "2")."""
    w = _text(token)
    return not w or bool(re.search(r"[0-9]", w)) or w[:1].isupper()


def pair_slots(tokens: list[str], positions: list[int], left: bool = False) -> list[list[int]]:
    """Slots of kept tokens (indices into `positions`, in order): two adjacent tokens of one run of
    context share a slot when one is `light` and neither is `heavy`; the rest stay alone. `left`: only
    the second of the two may be the light one (a stop word joins the token before it, never the
    content word after it: "as a" + "painter", not "as" + "a painter")."""
    slots: list[list[int]] = []
    i = 0
    while i < len(positions):
        j = i + 1
        if (j < len(positions) and positions[j] == positions[i] + 1
                and (light(tokens[j]) or (not left and light(tokens[i])))
                and not (heavy(tokens[i]) or heavy(tokens[j]))):
            slots.append([i, j])
            i += 2
        else:
            slots.append([i])
            i += 1
    return slots


@SELECTORS.register("merge")
@dataclass
class MergeSelector(LexicalSelector):
    """`lexical`'s anchors and windows, light tokens merged with a neighbour, and the slots freed
    given to more context: at most M slots that cover up to 2M context tokens."""

    weight: float = 0.5  # a light token's share of the slot it merges into (0.5: a plain mean)
    left: int = 0  # 1: a light token merges only into the token before it (`pair_slots`); 0: either side
    merges_slots = True  # a class flag, not a parameter: its messages need `merge_slots`

    def __post_init__(self):
        if not 0.0 < self.weight < 1.0:
            raise ValueError(f"merge weight must be in (0, 1), not {self.weight}")

    # `select` is lexical's: at most M tokens, what a text message (EXTRACT) of this selector sends

    def plan(self, view: SourceView, budget: int) -> tuple[list[int], list[list[int]]]:
        """The kept context tokens (indices into the context, in order) and their slots (indices
        into the kept tokens): the most tokens, up to 2 x `budget`, whose slots number at most `budget`."""
        n = view.context.stop - view.context.start
        if budget >= n:
            keep = list(range(n))
            return keep, [[i] for i in keep]
        scores = self.score(view)
        for tokens_budget in range(min(2 * budget, n), budget - 1, -1):
            keep = windows(scores, tokens_budget, self.before, round(self.after * tokens_budget / budget))
            slots = pair_slots([view.tokens[p] for p in keep], keep, bool(self.left))
            if len(slots) <= budget:
                return keep, slots
        raise AssertionError("a budget of M tokens always fits M slots")  # pairs only ever reduce the count

    def slot_weights(self, view: SourceView, keep: list[int], slots: list[list[int]]) -> list[float]:
        """Each kept token's weight in its slot: 1 alone; in a pair the light token `weight`, the other
        1 - `weight` (two light tokens: half each)."""
        w = [1.0] * len(keep)
        for s in slots:
            if len(s) == 2:
                la, lb = (light(view.tokens[keep[i]]) for i in s)
                wa = 0.5 if la == lb else (self.weight if la else 1.0 - self.weight)
                w[s[0]], w[s[1]] = wa, 1.0 - wa
        return w


def merge_slots(soft: torch.Tensor, slot_of: torch.Tensor | None, slot_weight: torch.Tensor | None) -> torch.Tensor:
    """(K, d) soft tokens of the kept tokens -> (S, d) slots: each slot the weighted sum of its
    tokens' soft tokens (weights summing to 1: a convex combination, inside the target's simplex
    when the soft tokens are). No groups: the soft tokens as they are."""
    if slot_of is None:
        return soft
    if len(slot_of) != len(soft):  # e.g. a Perceiver's K queries: its soft tokens are not the rows
        raise ValueError(f"{len(slot_of)} kept tokens but {len(soft)} soft tokens: merging slots needs a bridge "
                         f"with one soft token per row (aligned)")
    slot_of = slot_of.to(soft.device)
    out = soft.new_zeros(int(slot_of.max()) + 1 if len(slot_of) else 0, soft.shape[-1])
    return out.index_add_(0, slot_of, soft * slot_weight.to(soft)[:, None])
