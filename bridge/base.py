"""The bridge contract: what every bridge architecture is, and the registry that names them.

A bridge maps a packet of source hidden states (T rows of the source's layer-L states) to soft
tokens the target reads as input embeddings. Each architecture is one module that subclasses
`BridgeBase` and registers under the `arch` its manifest carries:

    @BRIDGES.register("perceiver")
    class PerceiverBridge(BridgeBase):
        config_class = PerceiverConfig
        train_job = JobRef("bridge.train", "bridge-perceiver")
        def forward(self, hidden, mask=None, token_ids=None): ...
        def num_soft_tokens(self, rows): ...

`bridge.load.load_bridge` picks the class from the manifest through `BRIDGES`, `latentwire train
bridge --arch` offers `BRIDGES.names()` and the bridge service asks the bridge itself (soft tokens
per packet, token index support) instead of testing for attributes.

Weights are safetensors plus a JSON manifest (`latentwire.weights`): the manifest's `config` is the
architecture's config dataclass, and loading refuses a file whose bytes do not match the sha256 the
manifest records.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from latentwire import weights
from latentwire.registry import Registry

BRIDGES: Registry[type[BridgeBase]] = Registry("bridge architecture")
LEGACY_ARCH = "perceiver"  # bridge files written before the manifest named its arch are Perceivers


@dataclass(frozen=True)
class JobRef:
    """An architecture's training job, by name: `module` registers the job `name` in
    `latentwire.jobs.TRAIN_JOBS` when imported. Names, so that the model module never imports its
    Ray trainer."""

    module: str
    name: str


class StatisticalNormalizer(nn.Module):
    """Whiten source states with calibrated per-dimension mean/std (learnable afterwards); the
    first layer of every architecture so far."""

    def __init__(self, d: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(d))
        self.log_std = nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) * torch.exp(-self.log_std)


class BridgeBase(nn.Module, metaclass=abc.ABCMeta):
    """Source hidden states (B, T, d_src) -> soft tokens (B, num_soft_tokens(T), d_tgt).

    Subclasses set `config_class` (a dataclass with source_model, target_model, source_layer, d_src,
    d_tgt, a `bridge_id` property and `arch`, defaulting to the name the class registers under) and
    `train_job`, and keep their config in `self.cfg`.
    """

    config_class: ClassVar[type]
    train_job: ClassVar[JobRef]

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.sha256 = ""  # of the weights file this bridge was loaded from (or last saved to)

    @abc.abstractmethod
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, d_src) [+ mask (B, T), 1 = real row] [+ the rows' source token ids (B, T),
        -1 where unknown] -> soft tokens (B, num_soft_tokens(T), d_tgt)."""

    @abc.abstractmethod
    def num_soft_tokens(self, rows: int) -> int:
        """How many soft tokens a packet of `rows` source rows becomes (the service trims a padded
        batch to this per packet)."""

    @property
    def bridge_id(self) -> str:
        return self.cfg.bridge_id

    @property
    def arch(self) -> str:
        """The name this kind is registered under in BRIDGES (its config's `arch` default)."""
        return self.cfg.arch

    # ---- capabilities: a kind without one keeps these defaults ---------------------------------
    def supports_token_index(self) -> bool:
        """Whether `use_token_index` can narrow this bridge's search (bridge/token_index.py)."""
        return False

    def use_token_index(self, offsets: torch.Tensor | None, rows: torch.Tensor | None) -> BridgeBase:
        raise TypeError(f"bridge {self.bridge_id} ({self.arch}) has no vocabulary search to index")

    # ---- weights ------------------------------------------------------------------------------
    def tensors_to_save(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What `save` writes: the state dict in `dtype`, by default."""
        return {k: v.to(dtype) for k, v in self.state_dict().items()}

    def save(self, path: str | Path, *, data: dict | None = None, metrics: dict | None = None,
             dtype: torch.dtype = torch.float32) -> dict:
        """Write safetensors + manifest. `dtype=torch.bfloat16` halves the file (loads back as fp32)."""
        man = weights.save(path, self.tensors_to_save(dtype), kind="bridge", config=dataclasses.asdict(self.cfg),
                           data=data,
                           metrics={**(metrics or {}), "stored_dtype": str(dtype).removeprefix("torch.")})
        self.sha256 = man["sha256"]
        return man

    @classmethod
    def config_from_manifest(cls, manifest: dict) -> Any:
        """The config dataclass of a manifest (sha-verified by the caller); a file written before
        manifests named the arch gets the config's default."""
        return cls.config_class(**manifest["config"])

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, target_path: str | None = None,
             search_dtype: str = "float32", sha256: str | None = None) -> BridgeBase:
        """The bridge at `path`, sha-verified (against its manifest and `sha256`, when the config pins
        one), in eval mode on `device`. `target_path`: the target model's weights, for a kind that reads
        rows of them; `search_dtype`: the precision of a vocabulary search. A kind that needs neither
        (this default) ignores them."""
        tensors, manifest = weights.load(path, kind="bridge", sha256=sha256)
        bridge = cls(cls.config_from_manifest(manifest))
        bridge.load_state_dict({k: v.float() for k, v in tensors.items()})
        bridge.sha256 = manifest["sha256"]
        return bridge.to(device).eval()


def manifest_arch(path: str | Path) -> str:
    """The `arch` the manifest beside `path` names (weights.load verifies the file afterwards)."""
    man = Path(path).with_suffix(".json")
    arch = json.loads(man.read_text()).get("config", {}).get("arch") if man.exists() else None
    return arch or LEGACY_ARCH
