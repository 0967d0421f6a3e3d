"""Markdown table of the budget runs (results/budget/val_*.json): EM per mode and budget.

    .venv/bin/python results/budget/summary.py
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
COLS = ["latent@8", "latent@16", "extract@16", "latent@32", "extract@32", "latent@64", "extract@64", "text@64",
        "latent@128", "latent@full", "direct", "none"]

print("| items | n | context tokens | " + " | ".join(c.replace("@", " ").upper() for c in COLS) + " |")
print("|" + "---|" * (len(COLS) + 3))
for path in sorted(HERE.glob("val_*.json")):
    r = json.loads(path.read_text())
    if "context_tokens" not in r or "direct" not in r["modes"]:
        continue
    cells = [f"{r['modes'][c]['em']:.2f}" if c in r["modes"] else "-" for c in COLS]
    print(f"| `{path.name}` | {r['n']} | {r['context_tokens']:.0f} | " + " | ".join(cells) + " |")
