#!/usr/bin/env bash
# eval-session as results/session/run.sh (Gemma 3 270M, 6 sessions x 32 turns, seed 1, 2 probes a turn
# from the 4th), dense beside FMKVC's hybrid memory at 8x with its exact entries chosen by context
# reconstruction over each turn (fmkvc:keep=1:select=reconstruction, compression/reconstruction.py):
# the same conversations as results/session/gemma3-270m.json, dense run again so the per-turn
# latencies are side by side in one run. docs/sessions.md reads the result. What ran: stopped after
# 2 of the 6 sessions (the JSON is written after each; `sessions_done: 2`), once the hybrid had
# derailed into repeating one answer; the remaining sessions did not fit the time.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
env PYTHONPATH="$PWD" $PY -c 'from latentwire.cli import main; main()' eval-session --model gemma3-270m \
  --methods dense,fmkvc:keep=1:select=reconstruction \
  --sessions 6 --turns 32 --ratio 8 --sink 4 --recent 64 --filler-tokens 96 --max-new-tokens 8 --threads 1 \
  --asks current --probes 2 --seed 1 \
  --json results/session/gemma3-270m-reconstruction.json --plot results/session/gemma3-270m-reconstruction.png
