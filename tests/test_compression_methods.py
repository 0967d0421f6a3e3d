"""The KV compression registry: every method by name, KVzip from kvpress among them, unknown names refused."""

import pytest
import torch

from compression.cache import cache_factory, factory
from compression.evaluate import EvalConfig, make_method, method_names, prefill
from compression.methods import COMPRESSORS
from compression.presses import nominal_budget
from latentwire import profiles
from latentwire.registry import UnknownKind

torch.set_num_threads(1)


def test_every_method_and_baseline_is_registered():
    assert {"dense", "mean_pool", "mean_pool_mass", "fmkvc", "streamingllm", "snapkv", "knorm",
            "expected_attention", "kvzip"} <= set(COMPRESSORS.names())
    assert "fmkvc_refine" in method_names()  # eval-cache still takes what users typed before


def test_kvzip_runs_through_the_registry_on_a_tiny_model():
    """eval-cache's path (make_method + prefill): KVzip replays the context with the tokenizer it is
    given and evicts down to the budget every method gets."""
    model, tok = profiles.load("tiny-llama")
    cfg, ratio, n = EvalConfig(model="tiny-llama", sink=4, recent=16), 4, 120
    ids = torch.randint(3, 600, (n,), generator=torch.Generator().manual_seed(6))
    cache, press = make_method("kvzip", model, cfg, ratio, n, tok)
    with torch.no_grad():
        logits = prefill(model, ids, cache, press)
    assert torch.isfinite(logits).all()
    budget = nominal_budget(n, ratio, cfg.sink, cfg.recent)
    # kvpress's KVzip evicts by masking scored entries (the cache keeps its length): over all layers and
    # KV heads it masks what the budget every method gets leaves out
    c = model.config
    masked = sum(int(layer.self_attn.masked_key_indices[0].numel()) for layer in model.model.layers)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [n] * c.num_hidden_layers
    assert masked == int(c.num_hidden_layers * c.num_key_value_heads * n * (1 - budget / n)) > 0


def test_an_unknown_method_is_refused_with_the_known_names():
    model, _ = profiles.load("tiny-llama")
    with pytest.raises(UnknownKind, match=r"unknown KV compression method 'zipper'; known: .*fmkvc.*mean_pool"):
        factory(method="zipper", profile="tiny-llama")
    with pytest.raises(UnknownKind, match="known: .*kvzip"):
        cache_factory(model, method="zipper")


def test_a_pruning_baseline_cannot_be_an_agents_cache():
    with pytest.raises(ValueError, match="prunes once at prefill"):
        factory(method="kvzip", profile="tiny-llama")
