"""Fact-transfer items: a short context about one person, a question whose answer is only there.

Every item is `{"id", "context", "question", "answer", "kind"}` (`kind` names the asked relation;
evaluation only needs the first four keys). The generator is seeded and the split is two-way
disjoint, so validation measures transfer rather than memorised templates or entities:

- by template: each relation has train and validation phrasings for its context sentence and for
  its question; validation items use only validation phrasings;
- by vocabulary: names, cities, colours, pets' names, jobs and months are partitioned, and numbers
  and years are split by value (`n % 3 == 0` belongs to validation), so no validation answer, and
  no validation person, appears anywhere in training.

Training can also draw names, cities, pets' names, rooms and years from a wide pool (`wide`):
words of the offline English corpus and numbers far outside the base ranges, still none of them in
the validation vocabulary. With only the base lists (about 50 names, 40 cities) a bridge learns a
lookup table of the training entities instead of a way to copy any entity (train NLL 0.01 against
held-out NLL 3.96, results/bridge/sweep.json); the wide pool is what makes copying the cheaper rule.

A context states three facts about its person (distinct relations, shuffled order); the question
asks for one of them, so the source must pass on the right one and NONE can only guess.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Alice Bruno Carla Daniel Elena Felix Greta Hugo Irene Jonas Karin Lukas Maria Nadia Oscar Paula "
         "Quentin Rosa Simon Tanja Ulrich Vera Walter Xenia Yusuf Zoe Anton Bianca Cyril Dora Emil Fiona "
         "Gustav Hanna Ivan Julia Kevin Lena Marco Nina Omar Petra Rafael Sofia Tobias Ursula Viktor Wanda "
         "Amir Beatrix Conrad Delia Edgar Flora Gideon Helga Ingrid Jasper Klaus Lotte Milan Nora Otto "
         "Priya Ronan Selma Theo Uma Vincent Wilma Yara Zeno Arjun Bettina Caspar Dalia Enzo Frida").split()
CITIES = ("Oslo Lima Cairo Dublin Madrid Vienna Prague Lisbon Athens Berlin Tokyo Nairobi Toronto Warsaw "
          "Helsinki Bogota Manila Hanoi Zurich Munich Seattle Denver Boston Chicago Sydney Perth Geneva "
          "Naples Porto Krakow Riga Tallinn Bergen Hamburg Lyon Marseille Seville Valencia "
          "Quito Havana Dakar Accra Kyoto Osaka Delhi Mumbai Tunis Beirut Ankara Muscat Leeds Glasgow").split()
COLOURS = "red blue green yellow black white orange purple pink brown grey silver gold beige violet".split()
PETS = ("Rex Bella Max Luna Charlie Daisy Rocky Coco Buddy Milo Teddy Ruby Oliver Lucky Ziggy Pepper "
        "Shadow Biscuit Ginger Simba Nala Toby Maple Oreo Pixel Mango Waffles Pumpkin Olive").split()
JOBS = ("teacher nurse pilot baker lawyer farmer dentist painter plumber chemist architect journalist "
        "librarian carpenter engineer florist butcher surgeon tailor mechanic").split()
MONTHS = "January February March April May June July August September October November December".split()

# relation -> (slot, train sentences, val sentences, train questions, val questions)
RELATIONS = {
    "city": ("city",
             ["{p} lives in {city}.", "{p} moved to {city} two years ago."],
             ["{p} has an apartment in {city}."],
             ["Which city does {p} live in?"], ["In what city is {p}'s home?"]),
    "age": ("age",
            ["{p} is {age} years old."],
            ["{p} just turned {age}."],
            ["How old is {p}?"], ["What age is {p}?"]),
    "colour": ("colour",
               ["{p} drives a {colour} car.", "{p}'s car is {colour}."],
               ["The car that {p} owns is painted {colour}."],
               ["What colour is {p}'s car?"], ["Which colour does {p}'s car have?"]),
    "year": ("year",
             ["{p} was born in {year}."],
             ["{p}'s year of birth is {year}."],
             ["In which year was {p} born?"], ["When was {p} born?"]),
    "pet": ("pet",
            ["{p} has a dog called {pet}.", "{p} owns a cat named {pet}."],
            ["{p}'s pet is called {pet}."],
            ["What is the name of {p}'s pet?"], ["What is {p}'s pet called?"]),
    "job": ("job",
            ["{p} works as a {job}."],
            ["{p} earns a living as a {job}."],
            ["What is {p}'s job?"], ["What does {p} do for a living?"]),
    "room": ("room",
             ["{p} stays in room {room}."],
             ["{p} was given room number {room}."],
             ["Which room is {p} staying in?"], ["What is {p}'s room number?"]),
    "date": ("date",
             ["{p} has a dentist appointment on {date}."],
             ["{p}'s appointment is scheduled for {date}."],
             ["On what date is {p}'s appointment?"], ["When is {p}'s appointment?"]),
}


def _split_list(xs: list[str], seed: int, val_frac: float = 0.3) -> tuple[list[str], list[str]]:
    xs = sorted(set(xs))
    random.Random(seed).shuffle(xs)
    n_val = max(1, round(len(xs) * val_frac))
    return sorted(xs[n_val:]), sorted(xs[:n_val])


def vocabulary(split: str, seed: int = 0) -> dict[str, list[str]]:
    """The entity vocabulary of one split ("train" | "val"); the two are disjoint per slot."""
    k = 0 if split == "train" else 1
    lists = {"p": NAMES, "city": CITIES, "colour": COLOURS, "pet": PETS, "job": JOBS, "month": MONTHS}
    voc = {slot: _split_list(xs, seed + i)[k] for i, (slot, xs) in enumerate(lists.items())}
    in_split = (lambda n: n % 3 != 0) if split == "train" else (lambda n: n % 3 == 0)
    voc["age"] = [str(n) for n in range(18, 90) if in_split(n)]
    voc["year"] = [str(n) for n in range(1940, 2010) if in_split(n)]
    voc["room"] = [str(n) for n in range(101, 460) if in_split(n) and n % 100 != 0]
    voc["day"] = [str(n) for n in range(1, 29)]  # dates: month + day; the month carries the split
    return voc


WIDE_SLOTS = ("p", "city", "pet", "room", "year")


def wide_vocabulary(seed: int = 0) -> dict[str, list[str]]:
    """Training-only pool for `WIDE_SLOTS`: capitalised corpus words and wide-range numbers
    (n % 3 != 0, like every training number), with every validation entity left out."""
    import re

    from latentwire.textdata import offline_corpus

    val = {w.lower() for xs in vocabulary("val", seed).values() for w in xs}
    words = sorted({w.lower() for para in offline_corpus() for w in re.findall(r"\b[a-z]{4,9}\b", para)} - val)
    return {"p": [w.capitalize() for w in words], "city": [w.capitalize() for w in words],
            "pet": [w.capitalize() for w in words],
            "room": [str(n) for n in range(460, 10000) if n % 3 and n % 100],
            "year": [str(n) for n in range(1700, 2100) if n % 3 and not 1940 <= n < 2010]}


def templates(split: str) -> dict[str, tuple[list[str], list[str]]]:
    """relation -> (context sentences, questions) of one split."""
    i = 1 if split == "train" else 2
    return {rel: (spec[i], spec[i + 2]) for rel, spec in RELATIONS.items()}


def _value(rel: str, pick) -> str:
    if rel == "date":
        return f"{pick('month')} {pick('day')}"
    return pick(RELATIONS[rel][0])


def generate(n: int, split: str = "train", seed: int = 0, facts: int = 3, wide: float = 0.0) -> list[dict]:
    """n items of one split, reproducible from (split, seed, wide). Vocab split uses a fixed seed.

    wide: share of names, cities, pets, rooms and years drawn from `wide_vocabulary` (train only)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= wide <= 1.0:
        raise ValueError(f"wide is a share of entities, between 0 and 1; got {wide}")
    if wide and split != "train":
        raise ValueError("the wide pool is for training only; validation keeps its held-out vocabulary")
    voc, tpl = vocabulary(split), templates(split)
    wide_voc = wide_vocabulary() if wide else {}
    rng = random.Random(f"{split}:{seed}")

    def pick(slot: str) -> str:
        # no draw for the coin when the slot has no wide pool: wide=0 keeps the base item stream
        return rng.choice(wide_voc[slot] if slot in wide_voc and rng.random() < wide else voc[slot])

    items = []
    rels = sorted(RELATIONS)
    for i in range(n):
        person = pick("p")
        chosen = rng.sample(rels, facts)
        values = {rel: _value(rel, pick) for rel in chosen}
        sentences = [rng.choice(tpl[rel][0]).format(p=person, **{RELATIONS[rel][0]: values[rel]}) for rel in chosen]
        asked = chosen[rng.randrange(facts)]
        question = rng.choice(tpl[asked][1]).format(p=person)
        items.append({"id": f"{split}-{seed}-{i:05d}", "context": " ".join(sentences), "question": question,
                      "answer": values[asked], "kind": asked})
    return items


def write_jsonl(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    return path


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    items = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        missing = {"context", "question", "answer"} - set(item)
        if missing:
            raise ValueError(f"{path}:{line_no}: item lacks {sorted(missing)}")
        item.setdefault("id", f"{Path(path).stem}-{line_no}")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write fact-transfer items as JSONL")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bridge/val.jsonl")
    a = ap.parse_args(argv)
    print(write_jsonl(generate(a.n, a.split, a.seed), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
