"""Timing helper shared by the probe scripts under results/ (not product code)."""

from __future__ import annotations

import statistics
import time


def median_ms(f, repeats: int = 5) -> float:
    """Median wall time of `repeats` calls of f, in ms, after one warm-up call."""
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
