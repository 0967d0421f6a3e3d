"""End-to-end distillation of the FMKVC sidecar through the frozen model (second training stage).

Force matching fits each layer's attention output locally, with the dense cache upstream. What it
cannot see is how the errors of 30 compressed layers compound: on SmolLM2 the force-matched sidecar
scores far better than dropping the old windows on its own held-out losses, yet worse than dropping
them in perplexity (results/compression/sidecar_variants.json). This stage closes that loop:

    teacher: dense cache of a context, then next-token distributions p of the following tokens
    student: the SAME context in an `FMKVCCache` whose super-tokens come from the sidecar with
             gradients on, then distributions q of the same tokens
    loss   = KL(p || q), averaged over the scored tokens; only the sidecar's weights move.

The student is the serving cache itself (same schedule, masks, positions, sliding-window eviction,
proportional attention), so what is trained is exactly what is served. No Ray here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from compression.cache import FMKVCCache, Schedule
from compression.methods.fmkvc import sidecar_compressor


def distill_loss(model, sidecar, ids: torch.Tensor, n_context: int, schedule: Schedule) -> torch.Tensor:
    """KL(dense || compressed) of the next-token distributions of ids[n_context:] given ids[:n_context].

    ids: (T,) token ids. `model` must be frozen (no parameter requiring grad); gradients reach `sidecar`."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("distill_loss needs a frozen model: call model.requires_grad_(False) first")
    ctx, cont = ids[:n_context][None], ids[n_context:][None]
    positions = torch.arange(n_context, ids.shape[0], device=ids.device)[None]
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        last = model(ctx, past_key_values=dense, logits_to_keep=1).logits[:, -1:]
        teacher = model(cont[:, :-1], past_key_values=dense, position_ids=positions[:, :-1]).logits
        teacher = torch.cat([last, teacher], 1).float().log_softmax(-1)
    student_cache = FMKVCCache(model.config, schedule, sidecar_compressor(sidecar, trainable=True))
    # grad mode on, but with the model frozen autograd records only what touches the super-tokens
    last = model(ctx, past_key_values=student_cache, logits_to_keep=1).logits[:, -1:].detach()
    student = model(cont[:, :-1], past_key_values=student_cache, position_ids=positions[:, :-1]).logits
    student = torch.cat([last, student], 1).float().log_softmax(-1)
    # the first scored token reads the dense prefill in both: its KL is 0 and it carries no gradient
    return F.kl_div(student[0], teacher[0], log_target=True, reduction="batchmean")


def documents(tok, n: int, length: int) -> list[torch.Tensor]:
    """Training text from the start of the offline corpus (eval-cache reads from its end)."""
    from compression.trajectories import token_samples

    docs = token_samples(tok, n, length)
    if tok.bos_token_id is not None:
        docs = [torch.cat([torch.tensor([tok.bos_token_id]), d[:-1]]) for d in docs]
    return docs

