"""The dense ceiling: every token stays in the cache."""

from __future__ import annotations

from dataclasses import dataclass

from compression.base import COMPRESSORS, Compressor


@COMPRESSORS.register("dense")
@dataclass
class Dense(Compressor):
    def compresses(self) -> bool:
        return False
