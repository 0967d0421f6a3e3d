"""FMKVC: a learned sidecar synthesises each window's super-token (docs/fmkvc.md).

The sidecar (compression/sidecar.py) is hard-normalised to the window's mean key/value norms and
trained to reproduce the attention output and its force dL/dq on the full cache. Options: the
sidecar (`weights`, or the one packaged for `profile`) and test-time refinement of the super-tokens
on each prompt's own tail (`refine_steps` > 0, compression/refine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.base import COMPRESSORS, Compressor, Schedule
from compression.refine import RefineConfig

_SIDECARS: dict[str, object] = {}


def load_sidecar(path: str | Path, device="cpu", sha256: str | None = None):
    """One loaded sidecar per (file, device, pinned digest), shared by every cache that uses it."""
    from compression.sidecar import Sidecar

    key = f"{Path(path).resolve()}:{device}:{sha256}"
    if key not in _SIDECARS:
        _SIDECARS[key] = Sidecar.load(path, device=device, sha256=sha256)
    return _SIDECARS[key]


@COMPRESSORS.register("fmkvc")
@dataclass
class FMKVC(Compressor):
    """
    Parameters
    ----------
    profile : str
        Model profile whose packaged sidecar to use (compression/weights/PROFILE.safetensors).
    weights : str
        Explicit sidecar weights (.safetensors with manifest); overrides `profile`.
    weights_sha256 : str
        The digest the deployment pins for those weights (or the packaged ones): loading refuses
        bytes that do not match it, whatever the manifest beside them says.
    refine_steps, refine_lr
        Test-time refinement after each prefill: optimiser steps (0: off) and Adam step.
    sidecar
        An already loaded sidecar (training, tests); `trainable`: super-tokens keep their graph to its
        weights, even inside a no_grad forward of the frozen model (compression/distill.py).
    """

    profile: str | None = None
    weights: str | Path | None = None
    weights_sha256: str | None = None
    refine_steps: int = 0
    refine_lr: float = 3e-4
    sidecar: object = field(default=None, repr=False)
    trainable: bool = False

    def bind(self, model, schedule: Schedule) -> None:
        if self.sidecar is None:
            from compression.sidecar import default_weights_path

            weights = self.weights
            if weights is None:
                if self.profile is None:
                    raise ValueError("fmkvc needs `weights` or `profile` (to find the packaged sidecar)")
                weights = default_weights_path(self.profile)
            self.sidecar = load_sidecar(weights, str(next(model.parameters()).device), self.weights_sha256)
        super().bind(model, schedule)

    def pool(self, keys, values, layer_idx):
        b, h, m, w, d = keys.shape
        slot = (layer_idx * h + torch.arange(h, device=keys.device)).repeat_interleave(m).repeat(b)
        with torch.set_grad_enabled(self.trainable):
            kt, vt = self.sidecar(keys.reshape(-1, w, d), values.reshape(-1, w, d), slot)
        return kt.reshape(b, h, m, d), vt.reshape(b, h, m, d)

    def proportional(self) -> bool:
        return self._loaded().cfg.proportional  # trained with the log-count bias or not

    def max_window(self) -> int | None:
        return self._loaded().cfg.max_window  # it has position embeddings for this many tokens

    def refinement(self) -> RefineConfig | None:
        return RefineConfig(steps=self.refine_steps, lr=self.refine_lr) if self.refine_steps else None

    def _loaded(self):
        if self.sidecar is None:
            raise RuntimeError("the fmkvc method has no sidecar yet: call bind(model, schedule) first")
        return self.sidecar


def sidecar_compressor(sidecar, trainable: bool = False) -> FMKVC:
    """The fmkvc method around an already loaded sidecar (training, distillation, tests)."""
    return FMKVC(sidecar=sidecar, trainable=trainable)
