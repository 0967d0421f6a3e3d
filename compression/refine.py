"""Test-time refinement of FMKVC super-tokens on the context itself (optional, at prefill).

The sidecar sees one window at a time; what a super-token must carry depends on the text that will
read it. Every prefill has such a reader at hand for free: the context's own newest tokens. So, after
a compressed prefill, the super-tokens are fitted for a few steps so that re-reading the newest
`n_tail` context tokens over `[sink | super-tokens | older dense]` gives the dense model's next-token
distributions at those positions (which the prefill computed anyway, the compression happening after
its attention):

    student  = model(tail tokens, over the cache minus its newest n_tail entries, true positions)
    loss     = KL(dense || student), averaged over the tail positions; only the super-tokens move

It is the distillation objective of compression/distill.py, applied per context to the super-tokens
themselves instead of to the sidecar's weights, in the spirit of Attention Matching's per-context
compaction (2026), with self-generated reference queries. Hard normalisation holds by construction:
only directions move (k~ = normalise(k0 / |k0| + dk) |k0|, the same for v~). Model frozen, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 30  # optimiser steps per context (0: off)
    lr: float = 3e-4  # Adam step on the unit directions (so the same for every model's key/value scale)
    tail: int = 0  # context tokens re-read per step; 0: the cache's `recent`

    def tail_tokens(self, cache, n_prompt: int) -> int:
        """Prompt tokens to re-read (and keep the prefill's logits for): `tail`, or the cache's
        `recent`, and always fewer than the prompt."""
        return min(self.tail or cache.schedule.recent, n_prompt - 1)


def refine_super_tokens(model, cache, tail_ids: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                        cfg: RefineConfig = RefineConfig(), *, tail_embeds: torch.Tensor | None = None) -> dict:
    """Fit the super-tokens of a prefilled `compression.cache.FMKVCCache` in place.

    tail_ids (n,) or tail_embeds (n, d_model): the newest n context tokens, already in the cache;
    teacher_logits (n, vocab): what the prefill predicted at those positions (dense attention).
    Returns {"kl_start", "kl_end", "steps", "n_tail", "n_super"}: KL before the first and after the last
    step, and the super-token entries fitted, summed over layers.
    """
    if not hasattr(cache, "prefix_view"):  # duck-typed: this module stays below compression.cache
        raise TypeError(f"refinement needs an FMKVCCache (compression.cache), not {type(cache).__name__}")
    if (tail_ids is None) == (tail_embeds is None):
        raise ValueError("give exactly one of tail_ids and tail_embeds")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("refinement needs a frozen model: call model.requires_grad_(False) first")
    tail = (tail_ids if tail_ids is not None else tail_embeds).detach()  # the prompt is data here, not a graph
    n = tail.shape[0]
    if teacher_logits is None or teacher_logits.shape[0] != n:
        raise ValueError(f"teacher_logits must hold one row per tail token ({n})")
    stored = min(layer.stored() for layer in cache.layers)
    if n >= stored:
        raise ValueError(f"the tail ({n} tokens) must be shorter than every layer's cache ({stored} entries)")
    teacher = teacher_logits.detach().float().log_softmax(-1)
    start = cache.layers[0].seen - n
    positions = torch.arange(start, start + n, device=tail.device)[None]
    # per layer: the prefix (all but the newest n entries), which of its entries are super-tokens
    prefix = []
    for layer in cache.layers:
        k0, v0 = layer.keys[:, :, :-n].detach(), layer.values[:, :, :-n].detach()
        is_super = (layer.log_count[:-n] != 0).to(k0.device)[None, None, :, None]
        prefix.append((k0, v0, is_super))
    n_super = sum(int(s.sum()) for _, _, s in prefix)
    if n_super == 0 or cfg.steps <= 0:
        return {"steps": 0, "n_tail": n, "n_super": n_super}
    dk = [torch.zeros_like(k0, requires_grad=True) for k0, _, _ in prefix]
    dv = [torch.zeros_like(v0, requires_grad=True) for _, v0, _ in prefix]
    opt = torch.optim.Adam(dk + dv, lr=cfg.lr)

    def rotated(x0, d, is_super):  # super-token entries: new direction, same norm; the rest untouched
        norm = x0.norm(dim=-1, keepdim=True)
        moved = F.normalize(x0 / norm.clamp_min(1e-6) + d, dim=-1) * norm
        return torch.where(is_super, moved, x0)

    def student_kl() -> torch.Tensor:
        view = cache.prefix_view(n, [rotated(k0, d, s) for (k0, _, s), d in zip(prefix, dk)],
                                 [rotated(v0, d, s) for (_, v0, s), d in zip(prefix, dv)])
        kwargs = {"input_ids": tail[None]} if tail_ids is not None else {"inputs_embeds": tail[None]}
        logits = model(**kwargs, past_key_values=view, position_ids=positions, use_cache=True).logits[0]
        return F.kl_div(logits.float().log_softmax(-1), teacher, log_target=True, reduction="batchmean")

    with torch.enable_grad():
        kl_start = None
        for _ in range(cfg.steps):
            loss = student_kl()
            kl_start = float(loss.detach()) if kl_start is None else kl_start
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        kl_end = float(student_kl())
        for layer, (k0, v0, s), a, b in zip(cache.layers, prefix, dk, dv):
            layer.keys = torch.cat([rotated(k0, a, s), layer.keys[:, :, -n:]], -2)
            layer.values = torch.cat([rotated(v0, b, s), layer.values[:, :, -n:]], -2)
    return {"kl_start": kl_start, "kl_end": kl_end, "steps": cfg.steps, "n_tail": n, "n_super": n_super}
