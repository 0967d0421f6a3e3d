"""FMKVC losses on the attention output of the FULL cache (sink + super-tokens + dense tail).

For one query q against keys k_i, values v_i (scale s):

    p = softmax(s q.k),  o = sum_i p_i v_i
    J = do/dq = s sum_i p_i v_i (k_i - kbar)^T,   kbar = sum_i p_i k_i
    force     F = dL/dq = J^T g,  g = dL/do (recorded with the trajectories)

Terms (each relative, per (layer, kv head) row then averaged, so no row or term wins by scale):
    output   ||o_dense - o_cg||^2 / ||o_dense||^2
    jacobian ||J_dense - J_cg||_F^2 / ||J_dense||_F^2, estimated with shared Gaussian probes r
             (E ||J r||^2 = ||J||_F^2), which avoids forming D x D matrices per query
    force    ||F - J_cg^T g||^2 / ||F||^2 with F the recorded force of the dense model
The super-token's scale is fixed by hard normalisation in the sidecar, not penalised here. With
`log_mass` = log W the coarse attention is proportional (each super-token counts as W tokens), as the
cache serves it (compression/attention.py); the Jacobian and force formulas hold unchanged, because a
constant score bias only reweights p.
"""

from __future__ import annotations

import torch

NEG = -1e30


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           bias: torch.Tensor | None = None):
    """q (N, Q, D), k/v (N, L, D), mask (N|1, Q, L) bool (True = visible), bias (L,) added to the scores
    (log-counts: proportional attention). Returns o (N, Q, D), p (N, Q, L)."""
    s = torch.einsum("nqd,nld->nql", q, k) * scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, NEG)
    p = torch.softmax(s, -1)
    return torch.einsum("nql,nld->nqd", p, v), p


def jacobian_probe(p, k, v, o, r, scale):
    """J r for probes r (R, D): (N, Q, R, D)."""
    kr = torch.einsum("nld,rd->nlr", k, r)  # k_i . r
    kbar_r = torch.einsum("nql,nlr->nqr", p, kr)
    return scale * (torch.einsum("nql,nlr,nld->nqrd", p, kr, v) - kbar_r[..., None] * o[:, :, None])


def force(p, k, v, g, scale):
    """J^T g for output gradients g (N, Q, D): (N, Q, D)."""
    vg = torch.einsum("nld,nqd->nql", v, g)  # v_i . g
    w = p * vg
    kbar = torch.einsum("nql,nld->nqd", p, k)
    return scale * (torch.einsum("nql,nld->nqd", w, k) - w.sum(-1, keepdim=True) * kbar)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def coarse_cache(k, v, kt, vt, sink: int, end: int):
    """Replace positions [sink, end) of (N, L, D) by the super-tokens kt/vt (N, m, D)."""
    return (torch.cat([k[:, :sink], kt, k[:, end:]], 1), torch.cat([v[:, :sink], vt, v[:, end:]], 1))


def causal_masks(qpos: torch.Tensor, length: int, sink: int, end: int, m: int):
    """Dense mask (Q, L) and coarse mask (Q, sink + m + L - end): super-tokens are older than every query."""
    pos = torch.arange(length)
    dense = pos[None] <= qpos[:, None]
    tail = pos[end:][None] <= qpos[:, None]
    head = torch.ones(len(qpos), sink + m, dtype=torch.bool)
    return dense, torch.cat([head, tail], 1)


def rel(ref: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """||ref - approx||^2 / ||ref||^2 per row (layer, kv head), averaged over rows: every head counts."""
    dims = tuple(range(1, ref.ndim))
    return ((ref - approx).pow(2).sum(dims) / ref.pow(2).sum(dims).clamp_min(1e-30)).mean()


def fmkvc_loss(q, k, v, g, f_ref, kt, vt, qpos, *, sink: int, end: int, scale: float, n_probes: int = 4,
               jac_weight: float = 1.0, force_weight: float = 1.0, log_mass: float = 0.0,
               generator=None) -> dict[str, torch.Tensor]:
    """All tensors per (layer, kv head) row N: q/g/f_ref (N, Q, D), k/v (N, L, D), kt/vt (N, m, D).
    log_mass: score bias of the super-tokens (log W for proportional attention, 0 for plain)."""
    m = kt.shape[1]
    dmask, cmask = causal_masks(qpos, k.shape[1], sink, end, m)
    dmask, cmask = dmask.to(q.device)[None], cmask.to(q.device)[None]
    kc, vc = coarse_cache(k, v, kt, vt, sink, end)
    bias = torch.zeros(kc.shape[1], device=q.device)
    bias[sink:sink + m] = log_mass
    o_d, p_d = attend(q, k, v, dmask, scale)
    o_c, p_c = attend(q, kc, vc, cmask, scale, bias)
    r = torch.randn(n_probes, q.shape[-1], generator=generator).to(q.device)  # CPU generator: same probes anywhere
    with torch.no_grad():
        jr_d = jacobian_probe(p_d, k, v, o_d, r, scale)
    jr_c = jacobian_probe(p_c, kc, vc, o_c, r, scale)
    f_c = force(p_c, kc, vc, g, scale)
    eps = 1e-30
    out = rel(o_d, o_c)
    jac = rel(jr_d, jr_c)
    frc = rel(f_ref, f_c)
    loss = out + jac_weight * jac + force_weight * frc
    with torch.no_grad():
        metrics = {
            "jacobian_norm_ratio": (jr_c.pow(2).sum() / (jr_d.pow(2).sum() + eps)).sqrt(),
            "force_norm_ratio": (f_c.pow(2).sum() / (f_ref.pow(2).sum() + eps)).sqrt(),
            "output_cosine": torch.nn.functional.cosine_similarity(o_d, o_c, dim=-1).mean(),
            "entropy_dense": entropy(p_d).mean(),
            "entropy_cg": entropy(p_c).mean(),
            # attention mass the compressed span gets: super-tokens vs the W-token windows they replace
            "mass_ratio": p_c[..., sink:sink + m].sum(-1).mean() / p_d[..., sink:end].sum(-1).mean().clamp_min(eps),
            "k_norm_ratio": kt.norm(dim=-1).mean() / k[:, sink:end].norm(dim=-1).mean(),
            "v_norm_ratio": vt.norm(dim=-1).mean() / v[:, sink:end].norm(dim=-1).mean(),
        }
    return {"loss": loss, "output": out, "jacobian": jac, "force": frc, **metrics}
