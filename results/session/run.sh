#!/usr/bin/env bash
# eval-session on the embedded target (gemma3-270m), CPU, 1 torch thread: 8 sessions x 32 turns,
# dense vs FMKVC at 8x vs kvpress pruning at the same entries; writes gemma3-270m.json and .png here.
set -euo pipefail
cd "$(dirname "$0")/../.."
nice -n 10 latentwire eval-session --model gemma3-270m --methods dense,fmkvc,streamingllm,snapkv,knorm \
  --sessions 8 --turns 32 --ratio 8 --sink 4 --recent 64 --filler-tokens 96 --max-new-tokens 8 --threads 1 \
  --json results/session/gemma3-270m.json --plot results/session/gemma3-270m.png
