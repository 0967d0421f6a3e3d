"""kvpress's pruning presses as eval-cache baselines: each keeps the budget's entries after prefill.

One small entry per press: which kvpress class, and how the shared schedule (sink, recent) maps onto
its parameters. They prune transformers' dense cache once at prefill (eval-cache; `serves()` is
False); an agent's cache, a session's included, prunes with their scores each time a prompt is read
(compression/session.py: `PrunedCache`, through `compression.session.factory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress
from torch import nn

from compression.base import COMPRESSORS, KVPressBaseline, Schedule


@COMPRESSORS.register("streamingllm")
@dataclass
class StreamingLLM(KVPressBaseline):
    def press(self, compression_ratio: float, schedule: Schedule):
        return StreamingLLMPress(compression_ratio=compression_ratio, n_sink=schedule.sink)


@COMPRESSORS.register("snapkv")
@dataclass
class SnapKV(KVPressBaseline):
    def press(self, compression_ratio: float, schedule: Schedule):
        return SnapKVPress(compression_ratio=compression_ratio, window_size=min(64, schedule.recent))


@COMPRESSORS.register("knorm")
@dataclass
class Knorm(KVPressBaseline):
    def press(self, compression_ratio: float, schedule: Schedule):
        return KnormPress(compression_ratio=compression_ratio)


@COMPRESSORS.register("expected_attention")
@dataclass
class ExpectedAttention(KVPressBaseline):
    def press(self, compression_ratio: float, schedule: Schedule):
        return LayerTypeExpectedAttentionPress(compression_ratio=compression_ratio, n_sink=schedule.sink)


@dataclass
class LayerTypeExpectedAttentionPress(ExpectedAttentionPress):
    """kvpress's ExpectedAttentionPress, averaging RoPE with each layer's own rotary parameters.

    Gemma 3 (transformers 5.x) has one `Gemma3RotaryEmbedding` for all layers holding per-layer-type
    inverse frequencies (`sliding_attention_inv_freq`: local base 10k, `full_attention_inv_freq`:
    global base 1M, maybe scaled); its `forward(x, position_ids, layer_type)` needs the type. kvpress
    0.5.5 calls `module.rotary_emb(mu, position_ids)` without it, so Gemma 3 failed with
    "no attribute 'None_inv_freq'". Here the call gets `module.layer_type` (sliding or full) when the
    rotary embedding keeps per-type frequencies; every other model (Llama, Mistral...) is unchanged.
    """

    def apply_avg_rope(self, module: nn.Module, mu: torch.Tensor, cov: torch.Tensor, q_len: int):
        layer_type = getattr(module, "layer_type", None)
        if layer_type is not None and hasattr(module.rotary_emb, f"{layer_type}_inv_freq"):
            # kvpress's apply_avg_rope reads only `head_dim` and `rotary_emb` from the module
            module = SimpleNamespace(head_dim=module.head_dim,
                                     rotary_emb=partial(module.rotary_emb, layer_type=layer_type))
        return super().apply_avg_rope(module, mu, cov, q_len)
