#!/usr/bin/env bash
# The bench's session workload on the embedded pair, CPU: the dense target and the FMKVC one (8x,
# deploy/local-fmkvc.yaml) side by side, 2 sessions of TURNS (default 8) LATENT turns each against
# both at once, each turn a 256-token context with one fact and its question; writes
# bench-sessions-${TURNS}t.json and .png here.
set -euo pipefail
cd "$(dirname "$0")/../.."
TURNS="${TURNS:-8}"
PYTHONPATH="$PWD" nice -n 10 "${PYTHON:-.venv/bin/python}" -m latentwire.cli bench --start-local \
  --config deploy/local-fmkvc.yaml --targets default,fmkvc \
  --requests 0 --session-turns "$TURNS" --concurrency 2 --context-tokens 256 --session-mode latent \
  --max-new-tokens 8 --message-tokens 64 --warmup 1 \
  --json "results/session/bench-sessions-${TURNS}t.json" --plot "results/session/bench-sessions-${TURNS}t.png"
