#!/usr/bin/env bash
# LATENT with 8-bit packets (wire_dtype int8: one float32 scale per row) against bfloat16, same items.
set -euo pipefail
cd "$(dirname "$0")/../.."
for dt in bfloat16 int8; do
  .venv/bin/latentwire eval --selector lexical --threads 2 --no-nll --max-new-tokens 10 --modes latent \
    --data results/budget/val_700_plain.jsonl --limit 12 --budgets 16,64 --wire-dtype $dt \
    --json results/budget/val_700_plain_latent_${dt}.json
done
