"""The Perceiver bridge, nanoGPT style: one file, a config dataclass, no framework.

StatisticalNormalizer (whiten source states, calibrated) -> PerceiverResampler (K learned queries
cross-attending to the T source states) -> OutputScaling (RMS-normalise, then scale to the target
embedding statistics). Unbounded outputs exploded and tanh bounding saturated in earlier work,
hence the RMS normalisation times a learned, calibrated scale. Calibrated by bridge/calibrate.py,
trained by bridge/train.py (`latentwire train bridge --arch perceiver`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bridge.base import BRIDGES, BridgeBase, StatisticalNormalizer, JobRef


@dataclass
class PerceiverConfig:
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
    arch: str = "perceiver"

    @property
    def bridge_id(self) -> str:
        return f"{self.source_model}@{self.source_layer}->{self.target_model}/K{self.num_queries}"


class ResamplerBlock(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
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

    def __init__(self, cfg: PerceiverConfig):
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


@BRIDGES.register("perceiver")
class PerceiverBridge(BridgeBase):
    config_class = PerceiverConfig
    train_job = JobRef("bridge.train", "bridge-perceiver")

    def __init__(self, cfg: PerceiverConfig):
        super().__init__(cfg)
        self.normalizer = StatisticalNormalizer(cfg.d_src)
        self.resampler = PerceiverResampler(cfg)
        self.scaling = OutputScaling(cfg.d_tgt)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, d_src) [+ mask (B, T), 1 = real token] -> soft tokens (B, K, d_tgt).
        `token_ids`: the search hint an aligned bridge's token index reads; the resampler has no use for it."""
        return self.scaling(self.resampler(self.normalizer(hidden.float()), mask))

    def num_soft_tokens(self, rows: int) -> int:
        return self.cfg.num_queries  # K whatever the packet's length
