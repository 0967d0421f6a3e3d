#!/usr/bin/env bash
# The EM-vs-budget runs of docs/budget.md (validation items of bridge/records.py), sized for a 2-core
# CPU: EM and F1 (no answer NLL), answers of at most 10 tokens, TEXT at M = 64.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { .venv/bin/latentwire eval --selector lexical --threads 2 --no-nll --max-new-tokens 10 --text-budgets 64 "$@"; }
run --data results/budget/val_700_plain.jsonl --limit 24 --budgets 8,16,32,64,128,full \
  --json results/budget/val_700_plain.json --plot results/budget/val_700_plain.png
run --data results/budget/val_2000_plain.jsonl --limit 16 --budgets 8,16,32,64,128,full \
  --json results/budget/val_2000_plain.json --plot results/budget/val_2000_plain.png
run --data results/budget/val_700_lookalike.jsonl --limit 10 --budgets 8,16,32,64,128,full \
  --json results/budget/val_700_lookalike.json --plot results/budget/val_700_lookalike.png
run --data results/budget/val_4000_plain.jsonl --limit 4 --budgets 16,64 \
  --json results/budget/val_4000_plain.json --plot results/budget/val_4000_plain.png
