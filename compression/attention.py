"""Proportional attention: a super-token that stands for W tokens gets the attention mass of W tokens.

Softmax attention gives one cache entry the weight exp(s). A window of W tokens with similar keys got
about W exp(s); its super-token, if scored like any entry, gets 1/W of that, and the compressed past
fades (the sidecar's held-out attention-mass ratio was 0.27 at W=8 on SmolLM2, 0.10 on Gemma 3). The
fix, as in Token Merging's proportional attention (Bolya et al., 2023), is a log-count bias:

    softmax(s_i + log n_i)        n_i = tokens entry i stands for (1 for a dense token, W for a super-token)

With it, a window of W identical tokens and its one super-token give the same attention output
exactly (tested). Hard normalisation pins the super-token's key norm, so the sidecar cannot buy
that mass by scaling its key; the bias supplies it.

How it reaches the attention: transformers does not pass the cache to its attention functions, so the
compressed cache layer *publishes* its entries' log-counts right before the attention of the same
layer runs (same thread, same forward), and the attention function registered here takes them and
adds them to the mask. Nothing published (dense caches, no super-tokens yet): it is plain SDPA.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "fmkvc_sdpa"
_local = threading.local()


def publish(layer_idx: int, log_count: torch.Tensor) -> None:
    """Log-counts (stored entries,) of `layer_idx`'s cache, for the attention call that follows."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        pending = _local.pending = {}
    pending[layer_idx] = log_count


def _take(layer_idx: int) -> torch.Tensor | None:
    pending = getattr(_local, "pending", None)
    return pending.pop(layer_idx, None) if pending else None


def proportional_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
    """transformers' SDPA attention plus the published log-count bias of this layer's cache."""
    log_count = _take(module.layer_idx)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        # transformers builds one mask per layer type, sized by the first layer of the type; this layer
        # holds another number of entries (a cache whose layers keep different budgets:
        # compression.cache.FMKVCCache.allocate_exact, one unpadded sequence). Its past is all visible,
        # the new queries causal among themselves.
        attention_mask = _causal(query, key)
    if log_count is not None:
        kv_len = key.shape[-2]
        bias = torch.zeros(kv_len, dtype=query.dtype, device=query.device)
        bias[:log_count.shape[0]] = log_count.to(query.device, query.dtype)
        if attention_mask is None:  # SDPA's causal shortcut: spell the causal mask out
            attention_mask = _causal(query, key)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                                         ).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask[..., :kv_len] + bias
    # dropout positional-or-keyword: kvpress re-wraps every registered attention function and passes it so
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def _causal(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The causal mask (1, 1, q, kv) of one unpadded sequence whose queries are the newest of its keys."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    qi = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=query.device)[None] <= qi)[None, None]


AttentionInterface.register(NAME, proportional_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model) -> None:
    """Switch `model` to proportional SDPA (identical to SDPA until a compressed cache publishes)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def enabled(config) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME
