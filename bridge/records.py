"""Long contexts that need compression: real text with a few planted records, one of them asked.

An item is `{"id", "context", "question", "answer", "kind", "tier", "target_tokens"}` like the
short fact items (`bridge/data.py`), but its context is 700-4000 tokens of real English prose with
`facts` one-sentence records about different people planted at random sentence boundaries. The
question asks about one record; its answer occurs nowhere else in the context (checked as a whole
word), so a message that drops the record cannot be right by luck and NONE stays at chance.

Tiers:
- `plain`: the records are about different relations (a city, an age, a pet...);
- `lookalike`: every record is the same relation about a different person ("Vera lives in Quito.",
  "Omar lives in Accra.", ...), so the reader must find the asked person, not just the relation.

What keeps validation honest: records use `bridge.data`'s split (templates, names, cities, numbers
disjoint between train and validation), and the prose differs too: training contexts are cut from
the pydoc topics that the bridge was fitted on (`latentwire.textdata`), validation contexts from
the docstrings of standard-library modules, which no job reads. Both ship with Python, so nothing
is downloaded and every machine makes the same items for a seed.
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import warnings

from bridge.data import RELATIONS, _value, templates, vocabulary, write_jsonl

CHARS_PER_TOKEN = 4.4  # English prose through the SmolLM2/Gemma tokenizers, measured on both corpora
TIERS = ("plain", "lookalike")
# modules whose docstrings (module, classes, functions) are the validation prose
_DOC_MODULES = ("argparse collections csv datetime decimal email.message fractions functools heapq http.client "
                "inspect io itertools json logging pathlib pickle queue random re shutil socket sqlite3 statistics "
                "string subprocess tarfile textwrap threading typing unittest urllib.parse uuid zipfile").split()


def _sentences(paragraphs) -> list[str]:
    out = []
    for para in paragraphs:
        para = " ".join(para.split())
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if 20 <= len(s) <= 400]
    return out


def prose(split: str) -> list[str]:
    """The sentences contexts are cut from: pydoc topics (train) or stdlib docstrings (val)."""
    if split == "train":
        from latentwire.textdata import offline_corpus

        return _sentences(offline_corpus())
    paras = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        with warnings.catch_warnings():  # typing's deprecated aliases warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = [mod.__doc__] + [getattr(getattr(mod, a), "__doc__", None) for a in sorted(vars(mod))
                                    if not a.startswith("_") and callable(getattr(mod, a))]
        paras += [p for d in docs if isinstance(d, str) for p in d.split("\n\n") if len(p) > 40 and ">>>" not in p]
    return _sentences(paras)


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value.lower())}(?![A-Za-z0-9])", text.lower()) is not None


def generate(n: int, split: str = "val", seed: int = 0, tokens: int = 700, facts: int = 4,
             tier: str = "plain") -> list[dict]:
    """n items of about `tokens` tokens each, reproducible from (split, seed, tokens, facts, tier)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    if not 2 <= facts <= len(RELATIONS):
        raise ValueError(f"facts must be 2..{len(RELATIONS)}, got {facts}")
    voc, tpl, text = vocabulary(split), templates(split), prose(split)
    rng = random.Random(f"records:{split}:{seed}:{tokens}:{facts}:{tier}")
    pick = lambda slot: rng.choice(voc[slot])  # noqa: E731
    items: list[dict] = []
    while len(items) < n:
        start = rng.randrange(len(text))
        body, size = [], 0
        while size < tokens * CHARS_PER_TOKEN:
            s = text[(start + len(body)) % len(text)]
            body.append(s)
            size += len(s) + 1
        people = rng.sample(voc["p"], facts)
        rels = [rng.choice(sorted(RELATIONS))] * facts if tier == "lookalike" else rng.sample(sorted(RELATIONS), facts)
        values = [_value(r, pick) for r in rels]
        if len({v.lower() for v in values}) < facts:
            continue  # look-alike records must differ in their answers
        records = [rng.choice(tpl[r][0]).format(p=p, **{RELATIONS[r][0]: v}) for p, r, v in zip(people, rels, values)]
        asked = rng.randrange(facts)
        others = " ".join(body + records[:asked] + records[asked + 1:])
        if _mentions(others, values[asked]) or any(_mentions(" ".join(body), p) for p in people):
            continue  # the answer must be unique in the context, and the people only in their records
        for rec in records:
            body.insert(rng.randrange(len(body) + 1), rec)
        question = rng.choice(tpl[rels[asked]][1]).format(p=people[asked])
        items.append({"id": f"records-{split}-{tier}-{tokens}-{seed}-{len(items):04d}", "context": " ".join(body),
                      "question": question, "answer": values[asked], "kind": rels[asked], "tier": tier,
                      "target_tokens": tokens})
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write long-context record items (planted facts in real prose) as JSONL")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=700, help="about this many context tokens per item")
    ap.add_argument("--facts", type=int, default=4, help="records planted per context")
    ap.add_argument("--tier", default="plain", choices=TIERS)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(write_jsonl(generate(a.n, a.split, a.seed, a.tokens, a.facts, a.tier), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
