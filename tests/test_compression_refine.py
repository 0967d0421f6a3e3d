"""Test-time refinement of super-tokens: it lowers the tail's KL, moves only super-token directions,
keeps the cache's schedule, and reads the same view of the cache as decoding does."""

import pytest
import torch

from compression import attention
from compression.cache import FMKVCCache, Schedule
from compression.methods.fmkvc import sidecar_compressor
from compression.distill import documents
from compression.refine import RefineConfig, refine_super_tokens
from compression.sidecar import Sidecar, SidecarConfig
from latentwire import profiles

torch.set_num_threads(1)
SCHEDULE = Schedule(window=4, sink=2, recent=8)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mistral"])
def frozen(request):
    model, tok = profiles.load(request.param)
    model.requires_grad_(False)
    attention.enable(model)
    return model, tok


def _compressed_prefill(model, ids, n_tail, schedule=SCHEDULE):
    torch.manual_seed(0)
    c = model.config
    sidecar = Sidecar(SidecarConfig(head_dim=c.head_dim, n_layers=c.num_hidden_layers,
                                    n_kv_heads=c.num_key_value_heads, d_model=32, n_heads=2))
    cache = FMKVCCache(model.config, schedule, sidecar_compressor(sidecar))
    with torch.no_grad():
        out = model(input_ids=ids[None], past_key_values=cache, position_ids=torch.arange(len(ids))[None],
                    logits_to_keep=n_tail)
    return cache, out.logits[0]


def _reread(model, cache, ids, n):
    view = cache.prefix_view(n, [layer.keys[:, :, :-n] for layer in cache.layers],
                             [layer.values[:, :, :-n] for layer in cache.layers])
    seen = view.get_seq_length()  # where the view says the next token goes
    with torch.no_grad():
        return seen, model(input_ids=ids[-n:][None], past_key_values=view,
                           position_ids=torch.arange(len(ids) - n, len(ids))[None]).logits[0]


def test_rereading_the_tail_over_the_prefix_view_is_exact_where_compression_is(frozen):
    """W = 1 (the untrained sidecar returns each token itself): re-reading the newest tokens over the
    view gives the prefill's own logits, so positions, masks and log-counts of the view are right;
    with real windows it differs, which is what refinement reduces."""
    model, tok = frozen
    ids = documents(tok, 1, 60)[0]
    n = SCHEDULE.recent
    exact, teacher = _compressed_prefill(model, ids, n, Schedule(window=1, sink=2, recent=n))
    seen, logits = _reread(model, exact, ids, n)
    assert seen == len(ids) - n
    torch.testing.assert_close(logits, teacher, atol=2e-5, rtol=1e-4)
    cache, teacher = _compressed_prefill(model, ids, n)
    _, logits = _reread(model, cache, ids, n)
    assert not torch.allclose(logits, teacher, atol=1e-3)
    assert cache.layers[0].stored() == SCHEDULE.expected_length(len(ids))  # the view left the cache as it was


def test_refinement_lowers_the_tail_kl_and_moves_only_super_token_directions(frozen):
    model, tok = frozen
    ids = documents(tok, 1, 60)[0]
    n = SCHEDULE.recent
    cache, teacher = _compressed_prefill(model, ids, n)
    before = [(layer.keys.clone(), layer.values.clone(), layer.log_count.clone()) for layer in cache.layers]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    info = refine_super_tokens(model, cache, ids[-n:], teacher, RefineConfig(steps=8, lr=0.01))
    assert info["kl_end"] < 0.8 * info["kl_start"]
    assert info["n_super"] == sum(int((b[2] != 0).sum()) for b in before)  # super-token entries, all layers
    assert info["n_super"] > 0
    moved = False
    for layer, (k0, v0, lc) in zip(cache.layers, before):
        sup = lc != 0
        assert layer.keys.shape == k0.shape and torch.equal(layer.log_count, lc)  # schedule and masses kept
        assert torch.equal(layer.keys[:, :, ~sup], k0[:, :, ~sup])  # sink and dense tokens untouched
        assert torch.equal(layer.values[:, :, ~sup], v0[:, :, ~sup])
        torch.testing.assert_close(layer.keys[:, :, sup].norm(dim=-1), k0[:, :, sup].norm(dim=-1))  # hard norms
        torch.testing.assert_close(layer.values[:, :, sup].norm(dim=-1), v0[:, :, sup].norm(dim=-1))
        moved |= not torch.allclose(layer.keys[:, :, sup], k0[:, :, sup])
        assert not layer.keys.requires_grad
    assert moved
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # the refined cache still decodes, and keeps compressing as it grows
        pos = len(ids)
        for step in range(SCHEDULE.window + 1):
            model(input_ids=ids[step:step + 1][None], past_key_values=cache, position_ids=torch.tensor([[pos]]))
            pos += 1
    assert cache.layers[0].stored() == SCHEDULE.expected_length(pos)


def test_refinement_refuses_what_it_cannot_fit(frozen):
    model, tok = frozen
    ids = documents(tok, 1, 60)[0]
    cache, teacher = _compressed_prefill(model, ids, 8)
    with pytest.raises(ValueError, match="one row per tail token"):
        refine_super_tokens(model, cache, ids[-8:], teacher[:-1])
    with pytest.raises(ValueError, match="exactly one"):
        refine_super_tokens(model, cache, None, teacher)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="FMKVCCache"):
        refine_super_tokens(model, DynamicCache(), ids[-8:], teacher)


def test_an_agent_with_refinement_answers_from_the_refitted_cache(tmp_path):
    """`kv_compression: {refine_steps: N}`: AgentModel refits after its prefill, exactly as
    refine_super_tokens does by hand, and the refitted super-tokens change what it answers."""
    from functools import partial

    from compression.cache import cache_factory
    from latentwire.runtime import AgentModel

    model, tok = profiles.load("tiny-llama")
    c = model.config
    torch.manual_seed(0)
    sidecar = Sidecar(SidecarConfig(head_dim=c.head_dim, n_layers=c.num_hidden_layers,
                                    n_kv_heads=c.num_key_value_heads, d_model=32, n_heads=2, model="tiny-llama"))
    sidecar.save(tmp_path / "sc.safetensors")
    make = partial(cache_factory, method="fmkvc", weights=str(tmp_path / "sc.safetensors"), window=4, sink=2, recent=8)
    refined = AgentModel("tiny-llama", model=model, tokenizer=tok,
                         cache_factory=partial(make, refine_steps=5, refine_lr=0.01))
    refined.eos_ids = set()  # random weights: run all steps
    ids = documents(tok, 1, 60)[0]
    x = refined.embed(ids[None])
    gen = refined.generate(x, 6)
    assert not any(p.requires_grad for p in model.parameters())
    # by hand: compressed prefill, refinement on the tail's embeddings, greedy decoding
    cache = make(model, refine_steps=5, refine_lr=0.01)
    with torch.no_grad():
        out = model(inputs_embeds=x, past_key_values=cache, position_ids=torch.arange(60)[None], logits_to_keep=8)
    info = refine_super_tokens(model, cache, None, out.logits[0], cache.refine, tail_embeds=x[0, -8:])
    assert info["kl_end"] < info["kl_start"]
    logits, ids_by_hand = out.logits[0, -1], []
    with torch.no_grad():
        for pos in range(60, 66):
            ids_by_hand.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[ids_by_hand[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[pos]])).logits[0, -1]
    assert gen.token_ids == ids_by_hand
    with pytest.raises(ValueError, match="needs method 'fmkvc'"):
        cache_factory(model, method="mean_pool", refine_steps=5)
