"""The fact-transfer generator: reproducible, and its validation split is unseen in training."""

import re

import pytest

from bridge import data


def test_same_seed_same_items_and_other_seed_other_items():
    assert data.generate(50, "train", seed=3) == data.generate(50, "train", seed=3)
    assert data.generate(50, "train", seed=3) != data.generate(50, "train", seed=4)
    assert data.generate(50, "val", seed=3) != data.generate(50, "train", seed=3)


def test_vocabularies_are_disjoint_per_slot():
    train, val = data.vocabulary("train"), data.vocabulary("val")
    for slot in ("p", "city", "colour", "pet", "job", "month", "age", "year", "room"):
        assert train[slot] and val[slot], slot
        assert not set(train[slot]) & set(val[slot]), slot


def test_templates_are_disjoint_per_relation():
    train, val = data.templates("train"), data.templates("val")
    for rel in data.RELATIONS:
        assert not set(train[rel][0]) & set(val[rel][0]), rel  # context sentences
        assert not set(train[rel][1]) & set(val[rel][1]), rel  # questions


def _question_template(item: dict) -> str:
    person = next(w for w in re.findall(r"[A-Z][a-z]+", item["question"]) if w in data.NAMES)
    return item["question"].replace(person, "{p}")


def test_validation_items_share_no_answer_person_or_question_with_training():
    train, val = data.generate(2000, "train"), data.generate(300, "val")
    train_answers = {it["answer"] for it in train}
    train_people = {w for it in train for w in re.findall(r"[A-Z][a-z]+", it["context"]) if w in data.NAMES}
    train_questions = {_question_template(it) for it in train}
    for it in val:
        assert it["answer"] not in train_answers, it
        assert not ({w for w in re.findall(r"[A-Z][a-z]+", it["context"])} & train_people), it
        assert _question_template(it) not in train_questions, it


def test_answer_is_in_the_context_and_not_in_the_question():
    for it in data.generate(300, "train") + data.generate(300, "val"):
        assert it["answer"] in it["context"]
        assert it["answer"] not in it["question"]
        assert set(it) == {"id", "context", "question", "answer", "kind"}


def test_jsonl_round_trip(tmp_path):
    items = data.generate(7, "val")
    path = data.write_jsonl(items, tmp_path / "v.jsonl")
    assert data.read_jsonl(path) == items
    assert data.read_jsonl(path, limit=3) == items[:3]


def test_committed_validation_file_is_the_seeded_val_split():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "results" / "bridge" / "val.jsonl"
    items = data.read_jsonl(path)
    assert len(items) == 200
    assert items == data.generate(200, "val", seed=0)


def test_wide_training_pool_stays_disjoint_from_validation():
    val_voc = {w.lower() for xs in data.vocabulary("val").values() for w in xs}
    wide = data.wide_vocabulary()
    for slot in data.WIDE_SLOTS:
        assert len(wide[slot]) > 200, slot  # far more entities than the base lists hold
        assert not {w.lower() for w in wide[slot]} & val_voc, slot
    train, val = data.generate(2000, "train", wide=0.7), data.generate(300, "val")
    train_answers = {it["answer"] for it in train}
    assert all(it["answer"] not in train_answers for it in val)
    base = {w for xs in data.vocabulary("train").values() for w in xs}
    drawn_wide = [it for it in train if it["kind"] in ("city", "pet", "room", "year") and it["answer"] not in base]
    assert len(drawn_wide) > 0.5 * sum(it["kind"] in ("city", "pet", "room", "year") for it in train)
    for it in train:
        assert it["answer"] in it["context"] and it["answer"] not in it["question"]
    assert data.generate(50, "train", wide=0.7) == data.generate(50, "train", wide=0.7)
    with pytest.raises(ValueError, match="training only"):
        data.generate(5, "val", wide=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            data.generate(5, "train", wide=bad)
