"""FMKVC: force-matched KV cache compression (sidecar, trajectories, losses, Ray Train job, presses, cache)."""
