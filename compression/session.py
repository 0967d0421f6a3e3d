"""A session's compressed memory: the KV cache of a conversation, kept within a budget as it grows.

A session (latentwire.sessions) appends every turn to one cache. Two kinds of registered method
keep that cache small, both keeping the first `sink` and the newest `recent` entries exact:

- a *window method* (fmkvc, mean_pool): `compression.cache.FMKVCCache` replaces each full window of
  W older entries by one super-token as the cache grows, turn after turn;
- a *pruning baseline* (a kvpress scorer press: streamingllm, snapkv, knorm, expected_attention):
  `PrunedCache` below. Whenever a prompt (a turn) is read into it and a layer holds more than its
  budget, the press scores that layer's entries as kvpress does at prefill (SnapKV from the newest
  prompt tokens' queries, KNorm from key norms, ...) and the lowest-scored older entries are evicted.

Both hold about the same number of entries per layer: the budget of a layer that a dense cache
would fill with n entries is `Schedule(ratio, sink, recent).expected_length(n)` (n: the tokens seen,
or the sliding window on a sliding-window layer), what the window method keeps at W = ratio.
One selection per layer: the press's scores are averaged over KV heads (Gemma 3 270M has one).
A sliding-window layer keeps its newest entries instead (the same in every such layer): transformers
builds one attention mask per layer type, so the layers of a type must hold equally many entries,
which per-layer scores followed by eviction by position would not give; old facts live in the
full-attention layers, which the press prunes.
"""

from __future__ import annotations

import dataclasses

import torch

from compression.base import Compressor, Schedule
from compression.cache import FMKVCCache

_HOOKED = "_latentwire_session_prune_hooks"


class PrunedCache(FMKVCCache):
    """A dense cache (true positions kept, like FMKVCCache's layers) that a kvpress scorer press
    prunes to its budget each time a prompt of more than one token is read into it."""

    def __init__(self, config, press, ratio: int, sink: int = 4, recent: int = 64):
        super().__init__(config, Schedule(ratio, sink, recent), None)
        self.press, self.budget_schedule = press, Schedule(ratio, sink, recent)
        self.pruned = 0  # entries evicted so far (all layers)

    def budget(self, layer) -> int:
        return self.budget_schedule.expected_length(layer.dense_length())

    @torch.no_grad()
    def prune_layer(self, module, kwargs: dict) -> None:
        layer = self.layers[module.layer_idx]
        stored, budget = layer.stored(), self.budget(layer)
        if stored <= budget:
            return
        if layer.sliding_window is None:
            hidden = kwargs["hidden_states"]
            press = dataclasses.replace(self.press, compression_ratio=1.0 - budget / stored)
            if hasattr(press, "window_size"):  # SnapKV reads the queries of the prompt's newest tokens
                press = dataclasses.replace(press, window_size=min(press.window_size, hidden.shape[1] - 1))
            layer.scores = press.score(module, hidden, layer.keys, layer.values, None, kwargs).float().mean((0, 1))
        if not layer.deferred:  # else end_turn evicts, with these scores
            self._evict(layer)

    def _evict(self, layer) -> None:
        """Evict down to the layer's budget: a sliding layer its oldest entries (the same in every one),
        a full-attention layer its lowest-scored ones, never `sink` or the newest `recent`; entries
        written after the scores (a turn's answer) count as newest."""
        stored, budget = layer.stored(), self.budget(layer)
        if stored <= budget:
            return
        if layer.sliding_window is not None:
            self._keep(layer, torch.arange(stored - budget, stored))
            return
        scores = getattr(layer, "scores", torch.zeros(0))[:stored]
        scores = torch.cat([scores, torch.full((stored - scores.shape[0],), float("inf"))])
        s = self.budget_schedule
        scores[:s.sink] = float("inf")
        scores[max(stored - s.recent, 0):] = float("inf")
        self._keep(layer, scores.topk(budget).indices.sort().values)

    def end_turn(self) -> None:
        for layer in self.layers:
            layer.deferred = False
            self._evict(layer)

    def _keep(self, layer, keep: torch.Tensor) -> None:
        self.pruned += layer.stored() - len(keep)
        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        layer.last_pos, layer.log_count = layer.last_pos[keep], layer.log_count[keep]
        if getattr(layer, "scores", None) is not None:
            layer.scores = layer.scores[keep[keep < layer.scores.shape[0]]]


def _hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    hidden = kwargs.get("hidden_states")
    if isinstance(cache, PrunedCache) and hidden is not None and hidden.shape[1] > 1:
        cache.prune_layer(module, kwargs)
    return output


def install_hooks(model) -> None:
    """Once per model: each attention module prunes a `PrunedCache` it has just read a prompt into
    (any other cache passes untouched, so dense and compressed sessions share one model)."""
    if getattr(model, _HOOKED, False):
        return
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(_hook, with_kwargs=True)
    setattr(model, _HOOKED, True)


def pruned_cache(model, compressor: Compressor, ratio: int, sink: int = 4, recent: int = 64) -> PrunedCache:
    """A session cache that `compressor` (a pruning baseline: a kvpress scorer press) keeps at about
    1/ratio of the dense entries, `sink` and `recent` exact."""
    pruned_cache_check(compressor, ratio, sink, recent)
    press = compressor.press(1.0 - 1.0 / ratio, Schedule(ratio, sink, recent))
    install_hooks(model)
    return PrunedCache(model.config, press, ratio, sink, recent)


def cache_factory(model, *, method: str = "fmkvc", profile: str | None = None, window: int = 8, sink: int = 4,
                  recent: int = 64, keep: int = 0, sliding_layers: str = "pool", select: str = "window",
                  tokenizer=None, **options):
    """The cache of an agent's generation, a session's included: a window method's `FMKVCCache`
    (compression.cache.cache_factory; `keep` exact entries per window), or for a pruning baseline a
    `PrunedCache` at ratio `window`."""
    from compression import cache

    compressor = _method(method, profile, options)
    if compressor.serves():
        return cache.cache_factory(model, method=method, profile=profile, window=window, sink=sink, recent=recent,
                                   keep=keep, sliding_layers=sliding_layers, select=select, tokenizer=tokenizer,
                                   **options)
    return pruned_cache(model, compressor, window, sink, recent)


def factory(**kwargs):
    """`compression.cache.factory` that also takes the pruning baselines (streamingllm, snapkv, knorm,
    expected_attention): the method and its options are checked now, the cache made per session or
    generation by `cache_factory`."""
    from functools import partial

    from compression import cache

    compressor = _method(kwargs.get("method", "fmkvc"), kwargs.get("profile"),
                         {k: v for k, v in kwargs.items() if k not in cache.LAYOUT})
    if compressor.serves():
        cache.factory(**kwargs)  # its own checks (e.g. the sidecar's weights)
    elif kwargs.get("keep") or kwargs.get("select", "window") != "window":
        option = f"keep={kwargs['keep']}" if kwargs.get("keep") else f"select={kwargs['select']}"
        raise ValueError(f"{option} needs a window method (fmkvc, mean_pool, ...): "
                         f"{compressor.name()!r} prunes whole entries")
    else:
        pruned_cache_check(compressor, kwargs.get("window", 8), kwargs.get("sink", 4), kwargs.get("recent", 64))
    return partial(cache_factory, **kwargs)


def pruned_cache_check(compressor: Compressor, ratio: int, sink: int, recent: int) -> None:
    from kvpress import ScorerPress

    press = compressor.press(1.0 - 1.0 / ratio, Schedule(ratio, sink, recent))
    if not isinstance(press, ScorerPress):
        raise ValueError(f"KV compression method {compressor.name()!r} is not a kvpress scorer press "
                         f"({type(press).__name__}): a session cache cannot prune with it")


def _method(method: str, profile: str | None, options: dict) -> Compressor:
    import compression.methods  # noqa: F401  (registers every method)
    from compression.base import build

    return build(method, context={"profile": profile}, **options)
