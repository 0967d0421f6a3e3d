"""FMKVC cache: dense when off, the expected length schedule when on, positions/masks right."""

from functools import partial
import math

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


# ---- the hybrid memory: `keep` exact entries per window, the rest pooled -----------------------------
def test_keep_leaves_each_windows_most_important_entries_exact_and_pools_the_rest():
    from compression.cache import compress_tail
    from compression.methods.mean_pool import MeanPool

    g = torch.Generator().manual_seed(0)
    b, h, w, keep, sink, recent = 2, 3, 8, 2, 2, 4
    keys, values = torch.randn(b, h, 30, 5, generator=g), torch.randn(b, h, 30, 5, generator=g)
    sched = Schedule(w, sink, recent, keep=keep)
    k2, v2, n_final, m = compress_tail(keys, values, 0, sched, MeanPool(), 0)
    assert m == 3 and n_final == sink + m * (keep + 1) and k2.shape[-2] == sched.expected_length(30) == 15
    for row in range(b):
        for i in range(m):
            win = slice(sink + i * w, sink + (i + 1) * w)
            norms = keys[row, :, win].norm(dim=-1).mean(0)  # the default importance: low key norm, mean over heads
            want = norms.topk(keep, largest=False).indices.sort().values
            out = slice(sink + i * (keep + 1), sink + (i + 1) * (keep + 1))
            got_k, got_v = k2[row, :, out], v2[row, :, out]
            # kept entries are exact, the ones this row's norms pick, in order (each batch row chooses for itself)
            assert torch.equal(got_k[:, :keep], keys[row, :, win][:, want])
            assert torch.equal(got_v[:, :keep], values[row, :, win][:, want])
            rest = [j for j in range(w) if j not in want.tolist()]
            torch.testing.assert_close(got_k[:, keep], keys[row, :, win][:, rest].mean(1))  # the rest pooled
            torch.testing.assert_close(got_v[:, keep], values[row, :, win][:, rest].mean(1))
    assert torch.equal(k2[:, :, :sink], keys[:, :, :sink]) and torch.equal(k2[:, :, -recent:], keys[:, :, -recent:])


def test_a_keep_that_leaves_nothing_to_pool_is_refused():
    with pytest.raises(ValueError, match="keep=7"):
        Schedule(8, 4, 16, keep=7)
    with pytest.raises(ValueError, match="keep=7"):
        cache_factory  # noqa: B018  (the serving factory checks the schedule before any model loads)
        from compression.cache import factory
        factory(method="mean_pool", window=8, keep=7)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_a_hybrid_cache_follows_its_schedule_and_keeps_counts_and_positions(name):
    """Prefill and decode with keep=1: every full-attention layer holds expected_length entries, the
    super-tokens (and only they) carry the log-count of the W - keep tokens they pool, and a window's
    entries leave a sliding layer together, so the layers of one type hold equally many entries
    (one mask per layer type) although each chose its own kept entries."""
    from compression.methods.mean_pool import MeanPoolMass

    model = tiny_gemma3() if name == "tiny-gemma3" else profiles.load(name)[0]
    from compression import attention
    attention.enable(model)
    sched = Schedule(window=8, sink=4, recent=16, keep=1)
    cache = FMKVCCache(model.config, sched, MeanPoolMass())
    ids = _ids(model, 300, seed=4)
    out = _run(model, ids, cache, 200)
    assert torch.isfinite(out).all()
    for layer in cache.layers:
        n = layer.stored()
        assert layer.log_count.shape[0] == n == layer.last_pos.shape[0]
        assert bool((layer.last_pos[1:] >= layer.last_pos[:-1]).all())  # in order: sliding eviction drops a prefix
        if layer.sliding_window is None:
            assert n == sched.expected_length(300)
            body = layer.log_count[4:layer.n_final].view(-1, 2)  # (kept, super) per window
            assert bool((body[:, 0] == 0).all()) and torch.allclose(body[:, 1], torch.tensor(math.log(7.0)))
            assert layer.last_pos[4:layer.n_final].view(-1, 2).tolist() == [
                [4 + 8 * i + 7] * 2 for i in range(body.shape[0])]  # a window's entries stand until its last token
        else:
            assert int(layer.last_pos[0]) >= 300 - layer.sliding_window
    by_type: dict = {}
    for layer in cache.layers:
        by_type.setdefault(layer.sliding_window, set()).add(layer.stored())
    assert all(len(sizes) == 1 for sizes in by_type.values()), by_type
    hybrid_entries = sum(cache.kv_lengths())
    plain = FMKVCCache(model.config, Schedule(window=8, sink=4, recent=16), MeanPoolMass())
    _run(model, ids, plain, 200)
    assert hybrid_entries > sum(plain.kv_lengths())  # the kept entries cost what they cost


def test_keep_passes_from_the_agent_setting_to_the_session_cache_and_pruning_methods_refuse_it():
    from compression.session import factory
    from latentwire.settings import KVCompression

    spec = KVCompression(method="mean_pool", window=16, keep=1, sink=2, recent=8)
    model, _ = profiles.load("tiny-llama")
    cache = factory(profile="tiny-llama", **spec.model_dump())(model)
    assert cache.schedule.keep == 1 and cache.schedule.per_window == 2
    with pytest.raises(ValueError, match="keep=1 needs a window method"):
        factory(method="knorm", profile="tiny-llama", window=8, keep=1)


def test_sliding_window_layers_can_keep_their_newest_entries_instead_of_pooling():
    """sliding_layers="newest": Gemma 3's sliding layers keep their newest entries (no super-token, as
    many entries as pooling would leave, the same in every such layer); the full-attention layers pool
    by the main schedule, kept entries included. "pool" (the FMKVCCache default) pools every layer."""
    from compression.cache import factory

    model = tiny_gemma3()
    ids = _ids(model, 300, seed=5)
    pooled = factory(method="mean_pool", window=8, sink=4, recent=16, keep=1, sliding_layers="pool")(model)
    newest = factory(method="mean_pool", window=8, sink=4, recent=16, keep=1, sliding_layers="newest")(model)
    a, b = _run(model, ids, pooled, 200), _run(model, ids, newest, 200)
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    for la, lb in zip(pooled.layers, newest.layers):
        if la.sliding_window is None:
            assert lb.schedule.keep == 1 and lb.stored() == la.stored() == la.schedule.expected_length(300)
        else:
            assert not lb.schedule.pool and lb.stored() == lb.schedule.expected_length(model.config.sliding_window - 1)
            assert lb.last_pos.tolist() == list(range(300 - lb.stored(), 300))  # the newest, exact
    with pytest.raises(ValueError, match="sliding_layers='some'"):
        factory(method="mean_pool", window=8, sliding_layers="some")


def test_sliding_layers_of_a_hybrid_cache_stay_aligned_when_chunks_follow_the_prefill():
    """Each layer keeps its own tokens exact, but transformers builds one attention mask per layer type:
    every sliding layer must hold as many entries as the first, or reading a chunk of several tokens
    after compression (eval-cache's continuation, a session's next turn) fails on the mask's size.
    Chunks after a prefill past the sliding window, with proportional attention (the fmkvc path)."""
    from compression import attention
    from compression.methods.mean_pool import MeanPoolMass

    model = tiny_gemma3()
    attention.enable(model)
    cache = FMKVCCache(model.config, Schedule(window=8, sink=4, recent=16, keep=1), MeanPoolMass())
    ids = _ids(model, 300, seed=0)
    pos = 0
    with torch.no_grad():
        for n in (200, 7, 20, 1, 31, 1):
            out = model(ids[:, pos:pos + n], past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(pos, pos + n)[None]).logits
            pos += n
            assert torch.isfinite(out).all()
            sliding = {layer.stored() for layer in cache.layers if layer.sliding_window is not None}
            assert len(sliding) == 1, sliding
