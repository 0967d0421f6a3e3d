"""Banded SDPA: a long prompt's attention in query chunks, each over only the keys its mask allows.

With an explicit mask (every sliding-window layer once a prompt outgrows its window, and every
padded batch) PyTorch's CPU SDPA kernels score each query against every key and mask afterwards:
a 1024-token prompt through Gemma 3's 512-token windows computes all 1024 x 1024 pairs and keeps
fewer than 400k of them. Split into chunks of `CHUNK` queries, each chunk attends to the span of
key columns that any of its mask rows allows. Every row's softmax then runs over the same allowed
keys as before, so the output is the same (up to float rounding); only the pairs that the mask
threw away are no longer computed. Without a mask (causal layers of an unpadded prompt) the kernel
already skips the future, and this is plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "banded_sdpa"
CHUNK = 256  # queries per chunk: 128-512 measured alike at 1024-2048 tokens; smaller chunks add calls
MAX_SHARE = 0.8  # chunk only when it skips at least a fifth of the pairs


def key_spans(mask: torch.Tensor, chunk: int) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) per chunk of query rows: the key columns any row of the chunk may see.

    `mask` is a boolean (..., q_len, kv_len) mask, True where attention is allowed. A chunk whose
    rows see nothing keeps every column, so that it meets the kernel exactly as before.
    """
    rows = mask.reshape(-1, *mask.shape[-2:]).any(0)  # (q_len, kv_len): allowed in any batch row
    spans = []
    for q0 in range(0, rows.shape[0], chunk):
        q1 = min(rows.shape[0], q0 + chunk)
        cols = rows[q0:q1].any(0).nonzero()
        k0, k1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, rows.shape[1])
        spans.append((q0, q1, k0, k1))
    return spans


def banded_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
    """transformers' SDPA attention, in query chunks over the key spans the mask allows."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if (attention_mask is None or attention_mask.dtype != torch.bool or q_len < 2 * CHUNK
            or attention_mask.shape[-2] != q_len):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    mask = attention_mask[..., :kv_len]
    spans = key_spans(mask, CHUNK)
    if sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in spans) > MAX_SHARE * q_len * kv_len:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, **kwargs)
    outs = [sdpa_attention_forward(module, query[..., q0:q1, :], key[..., k0:k1, :], value[..., k0:k1, :],
                                   mask[..., q0:q1, k0:k1], dropout=dropout, **kwargs)[0]
            for q0, q1, k0, k1 in spans]
    return torch.cat(outs, dim=1), None  # (batch, q_len, heads, head_dim), as sdpa_attention_forward


AttentionInterface.register(NAME, banded_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model) -> None:
    """Switch a CPU model that runs transformers' SDPA to banded SDPA (other attentions are left alone).

    CPU only: what was measured is the CPU kernels' (results/bench/banded_attention.json), and on a
    GPU each layer's span search would wait for the device.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
