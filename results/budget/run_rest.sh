#!/usr/bin/env bash
# The budget runs after val_700_plain (see run_all.sh for that one), sized for a 2-core CPU shared
# with other work: TEXT at M = 64 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { .venv/bin/latentwire eval --selector lexical --threads 2 --no-nll --max-new-tokens 10 "$@"; }
run --data results/budget/val_2000_plain.jsonl --limit 12 --budgets 8,16,32,64,128,full --text-budgets 64 \
  --json results/budget/val_2000_plain.json --plot results/budget/val_2000_plain.png
run --data results/budget/val_700_lookalike.jsonl --limit 16 --budgets 8,16,32,64,128,full --text-budgets 64 \
  --json results/budget/val_700_lookalike.json --plot results/budget/val_700_lookalike.png
run --data results/budget/val_4000_plain.jsonl --limit 6 --budgets 16,64 --text-budgets 64 \
  --json results/budget/val_4000_plain.json --plot results/budget/val_4000_plain.png
