"""Bridge model, nanoGPT style: one file, a config dataclass, no framework.

StatisticalNormalizer (whiten source states, calibrated) -> PerceiverResampler (K learned queries
cross-attending to the T source states) -> OutputScaling (RMS-normalise, then scale to the target
embedding statistics). Unbounded outputs exploded and tanh bounding saturated in earlier work,
hence the RMS normalisation times a learned, calibrated scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentwire import weights


@dataclass
class BridgeConfig:
    source_model: str
    target_model: str
    source_layer: int
    d_src: int
    d_tgt: int
    num_queries: int = 32  # K soft tokens
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    @property
    def bridge_id(self) -> str:
        return f"{self.source_model}@{self.source_layer}->{self.target_model}/K{self.num_queries}"


class StatisticalNormalizer(nn.Module):
    """Whiten source states with calibrated per-dimension mean/std (learnable afterwards)."""

    def __init__(self, d: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(d))
        self.log_std = nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) * torch.exp(-self.log_std)


class ResamplerBlock(nn.Module):
    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        d = cfg.d_model
        self.ln_q, self.ln_kv, self.ln_s, self.ln_m = (nn.LayerNorm(d) for _ in range(4))
        self.cross = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        kvn = self.ln_kv(kv)
        q = q + self.cross(self.ln_q(q), kvn, kvn, key_padding_mask=pad, need_weights=False)[0]
        qs = self.ln_s(q)
        q = q + self.self_attn(qs, qs, qs, need_weights=False)[0]
        return q + self.mlp(self.ln_m(q))


class PerceiverResampler(nn.Module):
    """K learned queries read a variable-length sequence of source states."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.d_src, cfg.d_model)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_tgt)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        kv = self.inp(h)
        q = self.queries.expand(h.shape[0], -1, -1)
        pad = None if mask is None else ~mask.bool()
        for blk in self.blocks:
            q = blk(q, kv, pad)
        return self.out(self.ln_out(q))


class OutputScaling(nn.Module):
    """RMS-normalise each soft token, then recolour to the target embedding statistics."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))  # calibrated: per-dim std of target embeddings
        self.shift = nn.Parameter(torch.zeros(d))  # calibrated: mean target embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.scale + self.shift


class Bridge(nn.Module):
    per_position = False  # K soft tokens whatever the packet's length

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.cfg = cfg
        self.normalizer = StatisticalNormalizer(cfg.d_src)
        self.resampler = PerceiverResampler(cfg)
        self.scaling = OutputScaling(cfg.d_tgt)
        self.sha256 = ""  # of the weights file this bridge was loaded from

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, d_src) [+ mask (B, T), 1 = real token] -> soft tokens (B, K, d_tgt).
        `token_ids`: the search hint an aligned bridge's token index reads; the resampler has no use for it."""
        return self.scaling(self.resampler(self.normalizer(hidden.float()), mask))

    @property
    def bridge_id(self) -> str:
        return self.cfg.bridge_id

    def save(self, path: str | Path, *, data: dict | None = None, metrics: dict | None = None,
             dtype: torch.dtype = torch.float32) -> dict:
        """Write safetensors + manifest. `dtype=torch.bfloat16` halves the file (loads back as fp32)."""
        tensors = {k: v.to(dtype) for k, v in self.state_dict().items()}
        man = weights.save(path, tensors, kind="bridge", config=asdict(self.cfg), data=data,
                           metrics={**(metrics or {}), "stored_dtype": str(dtype).removeprefix("torch.")})
        self.sha256 = man["sha256"]
        return man

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Bridge":
        tensors, manifest = weights.load(path, kind="bridge")
        bridge = cls(BridgeConfig(**manifest["config"]))
        bridge.load_state_dict({k: v.float() for k, v in tensors.items()})
        bridge.sha256 = manifest["sha256"]
        return bridge.to(device).eval()


def default_weights_path() -> Path:
    """The bridge shipped with the package for the embedded pair."""
    return Path(__file__).resolve().parent / "weights" / "smollm2-135m__gemma3-270m.safetensors"


def soft_token_stats(soft: torch.Tensor | list[torch.Tensor], target_rms: float) -> dict[str, float]:
    """Collapse diagnostics for a batch of soft tokens (B, K, d), or a list of (K_i, d) when the
    number of soft tokens varies per item (the aligned bridge: one per context token)."""
    items = [s.detach().float() for s in soft]
    flat = F.normalize(torch.stack([s.mean(0) for s in items]), dim=-1)  # one vector per item
    b = flat.shape[0]
    cos = (flat @ flat.T)[~torch.eye(b, dtype=torch.bool)].mean() if b > 1 else torch.tensor(float("nan"))
    rms = torch.cat([s.pow(2).mean(-1).sqrt() for s in items]).mean()
    return {"pairwise_cosine": float(cos), "rms_ratio": float(rms / target_rms)}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]


def load_bridge(path: str | Path, device: str = "cpu", target_path: str | None = None,
                search_dtype: str = "float32", token_index: str = "none"):
    """A Perceiver `Bridge` or a `bridge.aligned.AlignedBridge`, whichever the manifest names
    (`search_dtype`: the aligned bridge's nearest-row scoring, `AlignedBridge.use_search_dtype`;
    `token_index`: "auto" = the index beside the weights if there is one, a path, or "none";
    see bridge/token_index.py)."""
    import json

    man = Path(path).with_suffix(".json")  # the arch only picks the class; weights.load verifies
    arch = json.loads(man.read_text()).get("config", {}).get("arch") if man.exists() else None
    if arch == "aligned":
        from bridge import token_index as ti
        from bridge.aligned import AlignedBridge

        bridge = AlignedBridge.load(path, device=device, target_path=target_path, search_dtype=search_dtype)
        index = ti.default_path(path) if token_index == "auto" else None if token_index == "none" else Path(token_index)
        if index is not None and (index.exists() or token_index != "auto"):
            bridge.use_token_index(*ti.load(index, bridge))
        return bridge
    return Bridge.load(path, device=device)
