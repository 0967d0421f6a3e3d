"""Exact entries chosen by context reconstruction (compression/reconstruction.py): the scores are
KVzip's (checked against kvpress's own), the choice spreads a fixed budget over the layers, and a
cache whose layers then hold different numbers of entries still attends right."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from compression.cache import FMKVCCache, Schedule, compress_scored, new_cache
from compression.methods.mean_pool import MeanPool, MeanPoolMass, mean_pool_compressor
from compression.reconstruction import Reconstruction, fork
from latentwire import profiles

hf_logging.disable_progress_bar()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama():
    return profiles.load("tiny-llama")


def _ids(n, seed=0, vocab=290):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_scores_are_kvzips(llama):
    """Our scores are kvpress KVzipPress's (the same repeat prompt, one chunk): the largest attention
    any reconstruction query of a KV group pays each context entry."""
    from compression.methods.kvzip import TokenizerKVzipPress
    from transformers import DynamicCache

    model, _ = llama
    tok = profiles.load("tiny-llama")[1]
    tok.chat_template = None  # kvpress then prompts "Repeat ..." + "\n", nothing around the context
    ids = _ids(200)
    press = TokenizerKVzipPress(compression_ratio=0.5, tokenizer=tok)
    got = {}
    post = press.compress_post
    press.compress_post = lambda m: (got.setdefault("kvzip", press.score_val.clone()), post(m))
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    prompt = tok.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False) + tok.encode(
        "\n", add_special_tokens=False)
    cache = FMKVCCache(model.config, Schedule(16, 4, 16, keep=1), mean_pool_compressor)
    cache.hold()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    before = [(layer.keys, layer.seen) for layer in cache.layers]
    Reconstruction(torch.tensor(prompt), chunk=512).score(model, cache, model.get_input_embeddings()(ids))
    ours = torch.stack([layer.exact_scores for layer in cache.layers])  # (layers, KV heads, n)
    torch.testing.assert_close(ours, got["kvzip"][:, 0].float(), atol=1e-5, rtol=1e-4)
    # the repeat pass ran on a copy: the cache holds the context and nothing else
    assert all(layer.keys is k and layer.seen == s == 200 for layer, (k, s) in zip(cache.layers, before))


def test_compress_scored_keeps_each_heads_best_and_pools_the_rest_in_order():
    g = torch.Generator().manual_seed(3)
    sched = Schedule(window=8, sink=2, recent=4, keep=2)
    keys, values = torch.randn(1, 2, 30, 4, generator=g), torch.randn(1, 2, 30, 4, generator=g)
    scores = torch.rand(2, 30, generator=g)
    k, v, n_final, counts = compress_scored(keys, values, 0, sched, MeanPool(), 0, scores, exact=5)
    # sink 2, then m = (30 - 2 - 4) // 8 = 3 windows (24 entries): 5 exact + 19 pooled by 6 (3 + one of 1)
    assert counts.tolist() == [1] * 5 + [6, 6, 6, 1] and n_final == 2 + 9
    assert k.shape[-2] == 30 - 24 + 9
    torch.testing.assert_close(k[:, :, :2], keys[:, :, :2])
    torch.testing.assert_close(k[:, :, -4:], keys[:, :, -4:])  # the tail after the windows untouched
    for head in range(2):
        best = (scores[head, 2:26].topk(5).indices.sort().values + 2)
        torch.testing.assert_close(k[0, head, 2:7], keys[0, head, best])
        rest = [i for i in range(2, 26) if i not in best.tolist()]
        torch.testing.assert_close(v[0, head, 7], values[0, head, rest[:6]].mean(0))
        torch.testing.assert_close(v[0, head, 10], values[0, head, rest[18:]].mean(0))


def _scored_cache(model, tok, keep=1, window=16):
    cache = new_cache(model, MeanPoolMass(), Schedule(window, 4, 16, keep=keep),  # proportional, like FMKVC
                      reconstruct=Reconstruction.for_tokenizer(tok))
    ids = _ids(300, seed=1)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.after_prefill(model, out, input_ids=ids)
    return cache, ids


def test_the_budget_is_the_per_window_hybrids_spread_over_the_layers(llama):
    model, tok = llama
    cache, ids = _scored_cache(model, tok)
    uniform = Schedule(16, 4, 16, keep=1).expected_length(300)
    lengths = cache.kv_lengths()
    assert sum(lengths) <= len(lengths) * uniform  # no more entries in all than the per-window hybrid
    assert len(set(lengths)) > 1  # layers whose entries draw more reconstruction attention keep more
    for layer in cache.layers:
        assert layer.exact_budget is None and not layer.deferred  # compressed once, as the prompt was read
        assert torch.isnan(layer.exact_scores[:, 4:layer.n_final]).all()  # what was compressed is final
        assert float(layer.log_count.exp().sum()) == pytest.approx(300)  # every token counted once


def test_layers_of_different_lengths_attend_right(llama):
    """A prompt read in one pass over a cache whose layers hold different numbers of entries gives
    the logits of reading it token by token (one query needs no mask), so the mask each layer
    gets is causal over its own entries."""
    model, tok = llama
    cache, _ = _scored_cache(model, tok)
    assert len(set(cache.kv_lengths())) > 1
    more = _ids(6, seed=2)
    pos = cache.get_seq_length()
    twin = fork(cache)
    with torch.no_grad():
        at_once = model(input_ids=more, past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(pos, pos + 6)[None]).logits
        steps = torch.cat([model(input_ids=more[:, i:i + 1], past_key_values=twin, use_cache=True,
                                 position_ids=torch.tensor([[pos + i]])).logits for i in range(6)], 1)
    torch.testing.assert_close(at_once, steps, atol=1e-4, rtol=1e-4)


def test_select_reconstruction_needs_kept_entries_and_a_tokenizer(llama):
    from compression.base import method_spec
    from compression.cache import factory

    model, tok = llama
    with pytest.raises(ValueError, match="needs keep >= 1"):
        new_cache(model, mean_pool_compressor, Schedule(8, 4, 16), reconstruct=Reconstruction.for_tokenizer(tok))
    with pytest.raises(ValueError, match="'fmkvc:select=reconstruction'.*needs keep >= 1"):
        method_spec("fmkvc:select=reconstruction")
    with pytest.raises(ValueError, match="select='nope'"):
        factory(method="mean_pool", window=8, select="nope")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        factory(method="mean_pool", window=16, keep=1, select="reconstruction")(model)


def test_a_session_scores_each_turn_and_stays_within_budget():
    from compression.session import factory
    from latentwire.runtime import AgentModel
    from latentwire.sessions import SessionCaches
    from latentwire.settings import SessionLimits

    agent = AgentModel("tiny-llama")
    agent.eos_ids = set()
    agent.engine.cache_factory = factory(method="mean_pool", profile="tiny-llama", window=8, sink=2, recent=16,
                                         keep=1, select="reconstruction", tokenizer=agent.tok)
    store = SessionCaches(SessionLimits(max_tokens=1 << 20))
    for t in range(6):
        gen, s = store.answer(agent, "s", t, f"Vera has an apartment in Quito. Turn {t} of the talk.",
                              "In what city is Vera's home?", 3)
        assert len(gen.token_ids) == 3
        layers = s.state.kv_lengths()
        uniform = Schedule(8, 2, 16, keep=1).expected_length(s.state.get_seq_length())
        assert sum(layers) <= len(layers) * (uniform + 8)  # + a window's remainder per layer
    assert s.state.get_seq_length() > 4 * (2 + 8 + 16)  # well past the budget
    assert sum(layers) < 0.6 * len(layers) * s.state.get_seq_length()


def test_each_layer_scores_the_prompt_among_its_own_entries(llama):
    """A later prompt (a session's next turn) over layers that hold different numbers of older
    entries: every layer scores the prompt's own entries (a reference computed here from each
    layer's own length)."""
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    model, tok = llama
    cache, _ = _scored_cache(model, tok)
    assert len(set(cache.kv_lengths())) > 1
    cache.begin_turn()
    more = _ids(40, seed=4)
    pos = cache.get_seq_length()
    with torch.no_grad():
        model(input_ids=more, past_key_values=cache, use_cache=True, position_ids=torch.arange(pos, pos + 40)[None])
    seen = {}

    def spy(module, args, kwargs, output):  # what each attention block read in the repeat pass
        seen[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"],
                                  kwargs["past_key_values"].layers[module.layer_idx].keys)

    hooks = [layer.self_attn.register_forward_hook(spy, with_kwargs=True) for layer in model.model.layers]
    try:
        cache.reconstruct.score(model, cache, model.get_input_embeddings()(more))
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(cache.layers):
        hidden, (cos, sin), keys = seen[i]
        attn = model.model.layers[i].self_attn
        q = get_prerope_query_states(attn, hidden)
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        n_q, own = hidden.shape[1], layer.stored() - 40  # the prompt starts after the layer's own older entries
        h_kv, groups = keys.shape[1], q.shape[1] // keys.shape[1]
        k = torch.cat([keys[:, :, :4], keys[:, :, own:own + 40], keys[:, :, -n_q:]], 2).repeat_interleave(groups, 1)
        logits = q @ k.transpose(-1, -2) * attn.scaling
        logits[..., -n_q:] += torch.full((n_q, n_q), float("-inf")).triu(1)
        want = logits.softmax(-1)[..., 4:44].view(1, h_kv, groups, n_q, 40).amax(dim=(0, 2, 3))
        torch.testing.assert_close(layer.exact_scores[:, -40:], want, atol=1e-5, rtol=1e-4)


def test_an_agent_whose_settings_select_reconstruction_builds_that_cache():
    """kv_compression.select reaches the replica's cache factory, with the model's tokenizer (the repeat
    prompt is text), and an answer is generated through it."""
    from services.agent import AgentServicer

    agent = AgentServicer(dict(profile="tiny-llama", threads=1, kv_compression=dict(
        method="mean_pool", window=16, sink=4, recent=16, keep=1, select="reconstruction")))
    cache = agent.model.engine.new_cache()
    assert isinstance(cache.reconstruct, Reconstruction) and cache.schedule.keep == 1
    agent.model.eos_ids = set()
    gen = agent.model.generate(agent.model.target_inputs(None, "word " * 120), 3)
    assert len(gen.token_ids) == 3
