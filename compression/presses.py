"""Window methods (FMKVC, mean pooling: compression.methods) as kvpress presses (prefill, and decoding).

They keep `sink` tokens, replace each full window of `window` older tokens by one super-token and
keep the newest `recent` tokens dense. Unlike kvpress's pruning presses they also act during decoding:
after every forward pass the dense tail is coarse-grained again once it holds `window + recent`
tokens, so memory stays at about 1/window of the context however long the answer runs.

Use them like any press:

    with FMKVCPress(profile="smollm2-135m", window=8)(model):
        model(input_ids, past_key_values=cache)            # prefill, compressed
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    pipe(context, question=q, press=FMKVCPress(profile="smollm2-135m"))

The decoding-time part needs the press's context to stay open while decoding; kvpress's pipeline
closes it after prefill for non-decoding presses, so there the cache grows densely during the
(short) answer, exactly like every other press. `compression.cache.FMKVCCache` carries the same
schedule inside the cache itself (no hooks), which is what `AgentModel(cache_factory=...)` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import extract_keys_and_values
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from compression import attention
from compression.cache import FMKVCCache, Schedule, compress_tail, merge_log_count, proportional
from compression.methods import Compressor, build
from compression.methods.kvpress_baselines import LayerTypeExpectedAttentionPress


@dataclass
class WindowPress(BasePress):
    """A registered window method as a press: sink + one super-token per window + recent, prefill and decode.

    Parameters
    ----------
    method : str
        The registered window method (compression.methods) that pools each window.
    window : int
        W older tokens become one super-token (nominal compression ratio W).
    sink : int
        First tokens kept dense (attention sinks, as in StreamingLLM).
    recent : int
        Newest tokens kept dense; a window is compressed only once it is older than these.
    compress_decoding : bool
        Keep compressing as the cache grows during decoding (while the press context is open).
    """

    method: str = "mean_pool"
    window: int = 8
    sink: int = 4
    recent: int = 64
    compress_decoding: bool = True
    _compressor: Compressor | None = field(default=None, init=False, repr=False)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.window, self.sink, self.recent)

    def method_options(self) -> dict:
        """Options for the method (a subclass's own fields)."""
        return {}

    def post_init_from_model(self, model):
        if self._compressor is None:
            compressor = build(self.method, **self.method_options())
            if not compressor.serves():
                raise ValueError(f"{self.method!r} is a kvpress press itself, not a window method")
            compressor.bind(model, self.schedule)  # loads its weights, switches the attention if it needs to
            self._compressor = compressor

    def compressor(self) -> Compressor:
        if self._compressor is None:
            raise RuntimeError(f"{type(self).__name__} used outside `with press(model):`")
        return self._compressor

    def compress(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs):
        keys, values, _, _ = compress_tail(keys, values, 0, self.schedule, self.compressor(), module.layer_idx)
        return keys, values

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        cache = kwargs["past_key_values"]
        if isinstance(cache, FMKVCCache):  # that cache already compresses itself
            return output
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, DynamicSlidingWindowLayer):  # bounded already; its mask sizes assume it dense
            return output
        if is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            layer._fmkvc_final, layer._fmkvc_log_count = 0, torch.zeros(0)
        elif not self.compress_decoding:
            return output
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        log_count = getattr(layer, "_fmkvc_log_count", torch.zeros(0))
        log_count = torch.cat([log_count, torch.zeros(keys.shape[-2] - log_count.shape[0])])
        compressor = self.compressor()
        keys, values, n_final, m = compress_tail(keys, values, getattr(layer, "_fmkvc_final", 0), self.schedule,
                                                 compressor, module.layer_idx)
        layer._fmkvc_final = n_final
        if m:
            layer.keys, layer.values = keys, values
            log_count = merge_log_count(log_count, n_final - m * self.schedule.per_window, m, self.schedule, compressor)
            if proportional(compressor) and not isinstance(layer, ProportionalDynamicLayer):
                # it now holds super-tokens: the cache's slot gets a layer that publishes their counts
                layer = cache.layers[module.layer_idx] = ProportionalDynamicLayer.holding(layer, module.layer_idx)
        layer._fmkvc_log_count = log_count
        return output


class ProportionalDynamicLayer(DynamicLayer):
    """A transformers `DynamicLayer` holding super-tokens: before each attention call it publishes its
    entries' log-counts (compression/attention.py). The press puts one in the cache in place of each
    layer it compresses, so the bias outlives the press's `with` block, e.g. while kvpress's pipeline
    decodes the answer."""

    @classmethod
    def holding(cls, layer: DynamicLayer, layer_idx: int) -> "ProportionalDynamicLayer":
        """A new layer with `layer`'s state (keys, values, the press's bookkeeping), for `layer_idx`."""
        new = cls()
        new.__dict__.update(vars(layer))  # a DynamicLayer's whole state is its attributes
        new._fmkvc_layer_idx = layer_idx
        return new

    def update(self, key_states, value_states, cache_kwargs=None):
        attention.publish(self._fmkvc_layer_idx, self._fmkvc_log_count)
        keys, values = super().update(key_states, value_states, cache_kwargs)
        q = key_states.shape[-2]  # the new tokens stand for themselves
        self._fmkvc_log_count = torch.cat([self._fmkvc_log_count, torch.zeros(q)])
        return keys, values


@dataclass
class MeanPoolPress(WindowPress):
    """Naive coarse-graining (compression/methods/mean_pool.py): each window of W becomes its average."""

    method: str = "mean_pool"


@dataclass
class FMKVCPress(WindowPress):
    """FMKVC: force-matched KV cache compression (docs/fmkvc.md); `profile` and `weights` pick the
    sidecar as the method's own fields do (compression/methods/fmkvc.py: FMKVC)."""

    method: str = "fmkvc"
    profile: str | None = None
    weights: str | Path | None = None

    def method_options(self) -> dict:
        return {"profile": self.profile, "weights": self.weights}


def nominal_budget(n_tokens: int, window: int, sink: int, recent: int) -> int:
    """Entries kept for n_tokens of context (what the pruning baselines get at the same memory)."""
    return Schedule(window, sink, recent).expected_length(n_tokens)


__all__ = ["WindowPress", "MeanPoolPress", "FMKVCPress", "LayerTypeExpectedAttentionPress", "nominal_budget"]
