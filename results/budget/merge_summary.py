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

cols = [(f"{k}@{b}", f"{k.upper()} {b}") for b in BUDGETS for k in ("latent", "extract", *kinds)]
print("| items | n | context tokens | " + " | ".join(name for _, name in cols) + " |")
print("|" + "---|" * (len(cols) + 3))
for name, r in runs.items():
    cells = [f"{r['modes'][c]['em']:.2f}" if c in r["modes"] else "-" for c, _ in cols]
    print(f"| `{name}` | {r['n']} | {r['context_tokens']:.0f} | " + " | ".join(cells) + " |")

print("\nContext tokens carried per packet (mean):\n")
cov = [(f"{k}@{b}", f"{k.upper()} {b}") for b in BUDGETS for k in ("latent", *kinds)]
print("| items | " + " | ".join(name for _, name in cov) + " |")
print("|" + "---|" * (len(cov) + 1))
for name, r in runs.items():
    cells = [f"{r['modes'][c].get('context_covered', float('nan')):.1f}" if c in r["modes"] else "-" for c, _ in cov]
    print(f"| `{name}` | " + " | ".join(cells) + " |")

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
