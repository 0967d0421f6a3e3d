"""Naive coarse-graining: each window of W cached tokens becomes its plain average (k̄, v̄).

The baseline FMKVC must beat at equal memory; its keys shrink in norm when the window's keys
disagree (post-RoPE they rotate), so windows lose attention mass. `mean_pool_mass` gives the averages
the mass of their W tokens (proportional attention): the ablation that isolates what the sidecar learns.
"""

from __future__ import annotations

from dataclasses import dataclass

from compression.base import COMPRESSORS, Compressor
from compression.sidecar import mean_pool


@COMPRESSORS.register("mean_pool")
@dataclass
class MeanPool(Compressor):
    def pool(self, keys, values, layer_idx):
        return mean_pool(keys, values)


@COMPRESSORS.register("mean_pool_mass")
@dataclass
class MeanPoolMass(MeanPool):
    def proportional(self) -> bool:
        return True


mean_pool_compressor = MeanPool()
mean_pool_mass_compressor = MeanPoolMass()
