"""Markdown tables of the slot-merging runs (results/budget/merge_{,left_}val_*.json, `run_merge.sh`): EM per mode
at M = 16 and 32, the context tokens each LATENT packet carries, and item-by-item wins and losses of
each merged LATENT against today's LATENT and EXTRACT on the same items.

    .venv/bin/python results/budget/merge_summary.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))
from bridge.eval import exact_match  # noqa: E402

BUDGETS = (16, 32)
files = sorted(HERE.glob("merge_val_*.json")) + sorted(HERE.glob("merge_left_val_*.json"))
runs = {p.name: json.loads(p.read_text()) for p in files}
kinds = sorted({k.split("@")[0] for r in runs.values() for k in r["modes"] if k.startswith("latent-")})



def table(kinds_shown, cell, head=(), row=lambda name, r: ()):
    """One markdown row per run: `head` columns, then `cell(mode)` for each kind at each budget."""
    cols = [(f"{k}@{b}", f"{k.upper()} {b}") for b in BUDGETS for k in kinds_shown]
    print("| items | " + " | ".join([*head, *(name for _, name in cols)]) + " |")
    print("|" + "---|" * (len(cols) + len(head) + 1))
    for name, r in runs.items():
        cells = [cell(r["modes"][c]) if c in r["modes"] else "-" for c, _ in cols]
        print(f"| `{name}` | " + " | ".join([*row(name, r), *cells]) + " |")


table(("latent", "extract", *kinds), lambda m: f"{m['em']:.2f}", head=("n", "context tokens"),
      row=lambda name, r: (str(r["n"]), f"{r['context_tokens']:.0f}"))

print("\nContext tokens carried per packet (mean):\n")
table(("latent", *kinds), lambda m: f"{m.get('context_covered', float('nan')):.1f}")

print("\nItems a merged LATENT got right / wrong where the other got them wrong / right:\n")
print("| items | mode | vs LATENT (won / lost) | vs EXTRACT (won / lost) |")
print("|---|---|---|---|")
for name, r in runs.items():
    for kind in kinds:
        for b in BUDGETS:
            mode = f"{kind}@{b}"
            if mode not in r["modes"]:
                continue
            cells = []
            for other in (f"latent@{b}", f"extract@{b}"):
                won = lost = 0
                for it in r["items"]:
                    a, o = exact_match(it[mode], it["answer"]), exact_match(it[other], it["answer"])
                    won, lost = won + (a > o), lost + (a < o)
                cells.append(f"{won} / {lost}")
            print(f"| `{name}` | {kind.upper()} {b} | " + " | ".join(cells) + " |")
