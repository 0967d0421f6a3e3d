"""Every registered KV compression method, one module each; importing this package registers them.

Adding a method: one module here with a `Compressor` subclass under `@COMPRESSORS.register(name)`
(compression/base.py says what it writes), plus its import below. The cache factory, the presses,
eval-cache and its CLI then know it by name.
"""

from compression.base import COMPRESSORS, Compressor, build
from compression.methods import dense, fmkvc, kvpress_baselines, kvzip, mean_pool  # noqa: F401  (registrations)

__all__ = ["COMPRESSORS", "Compressor", "build"]
