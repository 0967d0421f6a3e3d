"""FMKVC cache: dense when off, the expected length schedule when on, positions/masks right."""

from functools import partial

import pytest
import torch
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from compression.cache import FMKVCCache, Schedule, cache_factory
from compression.methods.mean_pool import mean_pool_compressor
from latentwire import profiles
from tests.conftest import tiny_gemma3
from latentwire.runtime import AgentModel

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # 2 shared cores: oversubscription costs more than it gives


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def model(request):
    if request.param == "tiny-gemma3":  # Gemma 3 code path: sliding and full layers mixed, QK norm
        return tiny_gemma3()
    return profiles.load(request.param)[0]


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(model.config.vocab_size, 290), (1, n), generator=g)


def _run(model, ids, cache, n_prefill):
    with torch.no_grad():
        outs = [model(ids[:, :n_prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(n_prefill, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def test_compression_off_gives_dense_logits(model):
    ids = _ids(model, 280)  # beyond every sliding window here (256, 64), so eviction is exercised too
    dense = _run(model, ids, DynamicCache(config=model.config), 250)
    off = _run(model, ids, FMKVCCache(model.config, Schedule(8, 4, 16), compressor=None), 250)
    assert torch.equal(dense, off)


def test_identity_windows_reproduce_dense_across_prefill_and_decode(model):
    """W=1 coarse-graining is exact: every bookkeeping path (n_final, positions, eviction, masks) runs."""
    ids = _ids(model, 280, seed=1)
    dense = _run(model, ids, DynamicCache(config=model.config), 250)
    cache = FMKVCCache(model.config, Schedule(1, 4, 16), mean_pool_compressor)
    exact = _run(model, ids, cache, 250)
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=1e-5)


def test_cache_length_follows_schedule_in_prefill_and_decode():
    model, _ = profiles.load("tiny-llama")
    sched = Schedule(window=8, sink=4, recent=16)
    cache = FMKVCCache(model.config, sched, mean_pool_compressor)
    ids = _ids(model, 160)
    with torch.no_grad():
        model(ids[:, :100], past_key_values=cache, use_cache=True)
        assert cache.kv_lengths() == [4 + 10 + 16] * 4  # sink + (100-4-16)//8 windows + dense rest
        assert cache.get_seq_length() == 100  # tokens seen, not entries stored
        for t in range(100, 160):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            n = t + 1
            m = (n - 4 - 16) // 8
            assert cache.kv_lengths() == [n - 7 * m] * 4 == [sched.expected_length(n)] * 4
            assert 16 <= cache.kv_lengths()[0] - 4 - m < 16 + 8


def test_compressed_changes_logits_but_stays_close():
    model, _ = profiles.load("tiny-llama")
    ids = _ids(model, 160, seed=2)
    dense = _run(model, ids, DynamicCache(config=model.config), 150)[0, -1]
    comp = _run(model, ids, FMKVCCache(model.config, Schedule(8, 4, 16), mean_pool_compressor), 150)[0, -1]
    assert not torch.equal(dense, comp)
    assert torch.nn.functional.cosine_similarity(dense, comp, dim=0) > 0.9


def test_agentmodel_generate_matches_model_generate_with_compressed_cache():
    """AgentModel passes explicit positions and a mask of get_seq_length()+1; model.generate counts
    cache_position itself. Both must see the same compressed cache and pick the same tokens."""
    model, tok = profiles.load("tiny-llama")
    factory = partial(cache_factory, method="mean_pool", window=4, sink=4, recent=8)
    agent = AgentModel("tiny-llama", model=model, tokenizer=tok, cache_factory=factory)
    agent.eos_ids = set()  # random weights: run all steps
    ids = _ids(model, 120, seed=3)[0]
    gen = agent.generate(agent.embed(ids[None]), 20)
    with torch.no_grad():
        ref = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=20,
                             do_sample=False, past_key_values=factory(model), eos_token_id=None, pad_token_id=0)
    assert gen.token_ids == ref[0, 120:].tolist()
    assert len(gen.token_ids) == 20
