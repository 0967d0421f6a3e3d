#!/usr/bin/env bash
# LATENT with slot merging (`merge`, latentwire/merging.py) beside today's LATENT (lexical) and
# EXTRACT, on the same read of each item, at M = 16 and 32 (docs/budget.md, "Slots that merge
# tokens"). Sized for a 2-core CPU shared with other jobs: one thread, EM and F1 only, no TEXT,
# DIRECT or NONE (their figures are in val_*.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
run() { PYTHONPATH=$PWD $PY -m latentwire.cli eval --selector lexical --latent-selectors merge --modes latent,extract \
          --threads 1 --no-nll --max-new-tokens 10 --budgets 16,32 "$@"; }
run --data results/budget/val_700_plain.jsonl --limit 30 \
  --json results/budget/merge_val_700_plain.json --plot results/budget/merge_val_700_plain.png
run --data results/budget/val_700_lookalike.jsonl --limit 30 \
  --json results/budget/merge_val_700_lookalike.json --plot results/budget/merge_val_700_lookalike.png
run --data results/budget/val_2000_plain.jsonl --limit ${LIMIT_2000:-24} \
  --json results/budget/merge_val_2000_plain.json --plot results/budget/merge_val_2000_plain.png
# A second look, after the runs above: `merge:left=1` (a stop word joins only the token before it)
# beside the default, on the ~700-token plain items (docs/budget.md says why it is not the default).
PYTHONPATH=$PWD $PY -m latentwire.cli eval --selector lexical --latent-selectors 'merge,merge:left=1' \
  --modes latent,extract --threads 1 --no-nll --max-new-tokens 10 --budgets 16,32 \
  --data results/budget/val_700_plain.jsonl --limit 30 \
  --json results/budget/merge_left_val_700_plain.json --plot results/budget/merge_left_val_700_plain.png
