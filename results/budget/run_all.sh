#!/usr/bin/env bash
# The EM-vs-budget runs of docs/bridge.md "Budgeted packets" (validation items of bridge/records.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
LW=".venv/bin/latentwire"
for t in 700 2000; do
  for tier in plain lookalike; do
    $LW eval --data results/budget/val_${t}_${tier}.jsonl --budgets 8,16,32,64,128,full --text-budgets 16,64 \
      --selector lexical --threads 2 --json results/budget/val_${t}_${tier}.json --plot results/budget/val_${t}_${tier}.png
  done
done
$LW eval --data results/budget/val_4000_plain.jsonl --budgets 16,64,full --text-budgets 64 --selector lexical \
  --threads 2 --json results/budget/val_4000_plain.json --plot results/budget/val_4000_plain.png
# the other selectors, LATENT and EXTRACT only
for sel in attention prefix; do
  $LW eval --data results/budget/val_700_lookalike.jsonl --budgets 16,32,64 --modes latent,extract --selector $sel \
    --threads 2 --json results/budget/val_700_lookalike_${sel}.json
done
