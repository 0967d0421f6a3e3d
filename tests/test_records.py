"""Long-context record items (bridge/records.py): real prose, planted records, honest splits."""

from __future__ import annotations

import re

import pytest

from bridge.data import vocabulary
from bridge.records import CHARS_PER_TOKEN, generate, prose


@pytest.fixture(scope="module")
def items():
    return {(split, tier): generate(12, split, seed=1, tokens=700, tier=tier)
            for split in ("train", "val") for tier in ("plain", "lookalike")}


def _has(text: str, value: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z0-9]){re.escape(value.lower())}(?![A-Za-z0-9])", text.lower()))


def test_the_answer_occurs_once_in_its_context(items):
    for batch in items.values():
        for it in batch:
            assert _has(it["context"], it["answer"]) == 1, it["id"]


def test_contexts_are_about_the_asked_length(items):
    for batch in items.values():
        for it in batch:
            assert 0.9 * 700 * CHARS_PER_TOKEN <= len(it["context"]) <= 1.6 * 700 * CHARS_PER_TOKEN


def test_lookalike_records_share_the_asked_relation(items):
    """Four records, four people, one relation: the reader must find the asked person."""
    from bridge.data import RELATIONS, templates

    for it in items[("val", "lookalike")]:
        slot = RELATIONS[it["kind"]][0]
        shapes = [re.escape(t).replace(r"\{p\}", r"[A-Z]\w+").replace(re.escape("{" + slot + "}"), r"[\w ]+?")
                  for t in templates("val")[it["kind"]][0]]
        records = [m for shape in shapes for m in re.findall(shape, it["context"])]
        assert len(records) == 4, (it["id"], records)
        assert sum(_has(it["context"], p) for p in vocabulary("val")["p"]) == 4


def test_validation_shares_no_person_answer_or_prose_with_training(items):
    train = [it for tier in ("plain", "lookalike") for it in items[("train", tier)]]
    val = [it for tier in ("plain", "lookalike") for it in items[("val", tier)]]
    train_text = " ".join(it["context"] for it in train)
    assert not any(_has(train_text, p) for p in vocabulary("val")["p"])
    assert not {it["answer"] for it in train} & {it["answer"] for it in val}
    assert not set(prose("train")) & set(prose("val"))


def test_items_are_reproducible_and_refuse_bad_arguments():
    assert generate(3, "val", seed=5) == generate(3, "val", seed=5) != generate(3, "val", seed=6)
    with pytest.raises(ValueError, match="tier"):
        generate(1, tier="hard")
    with pytest.raises(ValueError, match="split"):
        generate(1, split="test")
