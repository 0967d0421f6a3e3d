#!/usr/bin/env bash
# eval-session on the embedded target (gemma3-270m), CPU, 1 torch thread: 6 sessions x 32 turns, each
# turn asking its own record, 2 probes a turn (from the 4th) asking earlier records on a dropped copy of
# the cache; dense vs FMKVC at 8x (plain, and keeping 1 exact entry per window of 16) vs KNorm pruning at
# the same entries. Seed 1: the conversations the variants were not tried on (trials used seeds 0 and 100).
set -euo pipefail
cd "$(dirname "$0")/../.."
latentwire eval-session --model gemma3-270m --methods dense,fmkvc,fmkvc:keep=1,knorm \
  --sessions 6 --turns 32 --ratio 8 --sink 4 --recent 64 --filler-tokens 96 --max-new-tokens 8 --threads 1 \
  --asks current --probes 2 --seed 1 \
  --json results/session/gemma3-270m.json --plot results/session/gemma3-270m.png
