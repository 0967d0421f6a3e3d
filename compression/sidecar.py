"""The FMKVC sidecar Phi: one window of W cached (key, value) pairs -> one super-token (k~, v~).

nanoGPT style: the whole model in this file, its config a dataclass, no framework in it.

    window (W x [k/|k|, v/|v|]) -> Linear + in-window position + layer embedding
      -> a few pre-norm transformer blocks (self-attention across the W tokens)
      -> set pooling with learned inducing points (one seed for k, one for v): attention weights a_i
      -> direction = sum_i a_i k_i + delta(pooled features)        (same for v)
      -> HARD normalisation: k~ = direction / |direction| * mean_i |k_i|   (same for v, or with
         value_norm="bounded": v~ = direction / max(1, |direction|) * mean_i |v_i|)

Why the hard normalisation: earlier attempts let the super-token's scale float and it collapsed under
output matching (Jacobian 50x too small) or exploded under Jacobian matching (24-105x too large).
Pinning |k~| and |v~| to the window's mean key/value norm *by construction* removes that degree of
freedom; the network only chooses directions. Seeds and deltas start at zero, so an untrained
sidecar is exactly "normalised mean pooling", a sane starting point that training improves.

Proportional attention: each super-token is scored with a + log W bias (compression/attention.py), so it
carries the attention mass of the W tokens it replaces; the losses train it that way.

Keys are post-RoPE (what the cache holds), so the super-token lives in that space and decodes at
any later position without re-rotation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KIND = "fmkvc-sidecar"


@dataclass
class SidecarConfig:
    head_dim: int = 64
    n_layers: int = 30  # attention layers of the host model
    n_kv_heads: int = 3  # KV heads per layer: each (layer, head) slot has its own embedding
    d_model: int = 128
    n_blocks: int = 2
    n_heads: int = 4
    max_window: int = 32
    windows: list[int] = field(default_factory=lambda: [4, 8, 16])  # window sizes it was trained for
    model: str = ""  # profile name of the host model
    # super-tokens read with proportional attention (a log W bias, compression/attention.py); trained so
    proportional: bool = True
    # "fixed": |v~| = window mean |v| (hard normalisation, the form that held against soft penalties); "bounded": |v~| <= window mean |v|, the pooled
    # value's own norm, which shrinks as the window's values disagree, like an attention average does
    value_norm: str = "fixed"


class Block(nn.Module):
    def __init__(self, cfg: SidecarConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Sidecar(nn.Module):
    def __init__(self, cfg: SidecarConfig):
        super().__init__()
        if cfg.value_norm not in ("fixed", "bounded"):
            raise ValueError(f"value_norm must be 'fixed' or 'bounded', not {cfg.value_norm!r}")
        self.cfg = cfg
        d = cfg.d_model
        self.inp = nn.Linear(2 * cfg.head_dim, d)
        self.pos = nn.Embedding(cfg.max_window, d)
        self.slot = nn.Embedding(cfg.n_layers * cfg.n_kv_heads, d)  # (layer, kv head)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        # set pooling: learned inducing points (seeds), one for keys and one for values
        self.seeds = nn.Parameter(torch.zeros(2, d))
        self.delta_k = nn.Linear(d, cfg.head_dim)
        self.delta_v = nn.Linear(d, cfg.head_dim)
        for lin in (self.delta_k, self.delta_v):  # start as normalised mean pooling
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.slot.weight, std=0.02)

    def forward(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor | int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: (N, W, head_dim) post-RoPE; slot = layer * n_kv_heads + kv_head, (N,) or int.
        Returns k~, v~: (N, head_dim)."""
        n, w, _ = keys.shape
        dtype = keys.dtype
        keys, values = keys.float(), values.float()
        k_norm = keys.norm(dim=-1).mean(-1, keepdim=True).clamp_min(1e-6)  # (N, 1) window mean norms
        v_norm = values.norm(dim=-1).mean(-1, keepdim=True).clamp_min(1e-6)
        kh, vh = keys / k_norm[..., None], values / v_norm[..., None]  # scale-free inputs
        if isinstance(slot, int):
            slot = torch.full((n,), slot, dtype=torch.long, device=keys.device)
        x = self.inp(torch.cat([kh, vh], -1)) + self.pos.weight[:w] + self.slot(slot)[:, None]
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        a = torch.softmax(torch.einsum("nwd,sd->nsw", x, self.seeds) / math.sqrt(x.shape[-1]), -1)  # (N, 2, W)
        pooled = torch.einsum("nsw,nwd->nsd", a, x)
        k_dir = torch.einsum("nw,nwd->nd", a[:, 0], kh) + self.delta_k(pooled[:, 0])
        v_dir = torch.einsum("nw,nwd->nd", a[:, 1], vh) + self.delta_v(pooled[:, 1])
        k_t = F.normalize(k_dir, dim=-1, eps=1e-6) * k_norm  # hard normalisation, by construction
        if self.cfg.value_norm == "bounded":  # never above the window's mean norm, by construction
            v_t = v_dir / v_dir.norm(dim=-1, keepdim=True).clamp_min(1.0) * v_norm
        else:
            v_t = F.normalize(v_dir, dim=-1, eps=1e-6) * v_norm
        return k_t.to(dtype), v_t.to(dtype)

    # ---- weights (safetensors + manifest, via latentwire.weights) ------------------------
    def save(self, path: str | Path, *, data: dict | None = None, metrics: dict | None = None) -> dict:
        from latentwire import weights

        return weights.save(path, self.state_dict(), kind=KIND, config=asdict(self.cfg), data=data, metrics=metrics)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", sha256: str | None = None) -> "Sidecar":
        from latentwire import weights

        tensors, manifest = weights.load(path, kind=KIND, sha256=sha256)
        # sidecars saved before proportional attention existed were trained without it
        model = cls(SidecarConfig(**{"proportional": False, "value_norm": "fixed", **manifest["config"]}))
        model.load_state_dict(tensors)
        model.manifest = manifest
        return model.to(device).eval()


def mean_pool(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive coarse-graining: the plain average of the window (its norm shrinks as keys disagree)."""
    return keys.mean(-2), values.mean(-2)


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"


def default_weights_path(model: str) -> Path:
    return weights_dir() / f"{model}.safetensors"
