"""The agent runtime: prompts, BOS, attention masks and positions with `inputs_embeds`."""

import pytest
import torch

from latentwire.errors import InvalidArgument, ResourceExhausted
from latentwire.runtime import AgentModel
from latentwire.settings import Limits


def test_target_inputs_start_with_bos_and_wrap_the_payload(tiny_target):
    m = tiny_target
    soft = torch.randn(5, m.hidden_size)
    embeds = m.target_inputs(soft, "Where is it?")[0]
    bos = m.embed(torch.tensor([[m.tok.bos_token_id]]))[0, 0]
    assert torch.equal(embeds[0], bos)  # BOS is easy to lose with inputs_embeds
    n_prefix = m.prefix_embeds().shape[0]
    assert torch.equal(embeds[n_prefix:n_prefix + 5], soft)
    # the primer sits right before the payload, identically for every request
    prefix_text = m.tok.decode(m.tokenize(m.prompts.target_template("?")[0]))
    assert prefix_text.endswith(m.profile.primer)


def test_modes_differ_only_in_the_payload(tiny_target):
    m = tiny_target
    q = "What colour?"
    none, text = m.target_inputs(None, q)[0], m.target_inputs("the car is red", q)[0]
    n_prefix, n_msg = m.prefix_embeds().shape[0], len(m.tokenize("the car is red"))
    assert torch.equal(none[:n_prefix], text[:n_prefix])
    assert torch.equal(none[n_prefix:], text[n_prefix + n_msg:])


def test_generate_from_embeddings_matches_hf_generate(tiny_source):
    """Explicit positions and mask in our loop give the same greedy tokens as model.generate."""
    m = tiny_source
    ids = m.tokenize(m.render("Tell me about the def statement."))
    ours = m.generate(m.embed(ids[None]), max_new_tokens=12)
    ref = m.model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=12,
                           do_sample=False, eos_token_id=list(m.eos_ids), pad_token_id=m.tok.pad_token_id)
    ref_ids = [t for t in ref[0, len(ids):].tolist() if t not in m.eos_ids]
    assert ours.token_ids == ref_ids[:len(ours.token_ids)] and len(ours.token_ids) > 0


def test_hidden_states_equal_the_full_forward_at_that_layer(tiny_source):
    m = tiny_source
    ids = m.tokenize("for i in range(10): print(i)")
    with torch.no_grad():
        full = m.model(ids[None], output_hidden_states=True).hidden_states
    assert torch.allclose(m.hidden_states(ids, 2), full[2][0], atol=1e-5)
    with pytest.raises(ValueError):
        m.hidden_states(ids, m.num_layers + 1)


def test_batched_hidden_states_ignore_padding(tiny_source):
    m = tiny_source
    a, b = m.tokenize("short text"), m.tokenize("a somewhat longer piece of text here")
    pad = torch.full((len(b) - len(a),), m.tok.pad_token_id)
    ids = torch.stack([torch.cat([a, pad]), b])
    mask = torch.stack([torch.cat([torch.ones_like(a), torch.zeros_like(pad)]), torch.ones_like(b)])
    with torch.no_grad():
        batched = m.hidden_states_batch(ids, mask, 2)
    assert torch.allclose(batched[0, :len(a)], m.hidden_states(a, 2), atol=1e-5)


def test_source_limits_are_enforced(tiny_source):
    m = AgentModel(tiny_source.profile, model=tiny_source.model, tokenizer=tiny_source.tok,
                   limits=Limits(max_context_tokens=32, max_question_chars=10))
    with pytest.raises(ResourceExhausted, match="32"):
        m.source_ids("word " * 100, "Why?")
    with pytest.raises(InvalidArgument) as err:
        m.source_ids("ctx", "a very long question")
    assert err.value.field == "question"


def test_soft_tokens_of_the_wrong_width_are_refused(tiny_target):
    with pytest.raises(InvalidArgument, match="soft tokens"):
        tiny_target.payload_embeds(torch.zeros(3, tiny_target.hidden_size + 1))


@pytest.mark.parametrize("which", ["tiny_source", "tiny_target"])
def test_batched_answers_equal_one_by_one_answers(which, request):
    """Left padding with real-token positions: batching must not change any answer."""
    m = request.getfixturevalue(which)
    jobs = [(None, "What?", 7), ("the red car is parked in Oslo near the old harbour", "Where is it?", 5),
            (torch.randn(4, m.hidden_size) * 0.05, "Who?", 9)]
    single = [m.answer(*j) for j in jobs]
    batch = m.answer_batch(jobs)
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [len(b.token_ids) for b in batch] == [7, 5, 9]
    assert [b.cache_tokens for b in batch] == [s.cache_tokens for s in single]


def test_batched_hidden_states_equal_one_by_one(tiny_source):
    """Right padding and length groups: every job gets exactly its own (T_i x d) states."""
    m = tiny_source
    texts = ["a", "the red car is parked in Oslo", "x " * 40, "the blue boat", "y " * 45]
    jobs = [(m.source_ids(t, "Where?"), layer) for t, layer in zip(texts, [2, 2, 2, 1, 2])]
    single = [m.hidden_states(*j) for j in jobs]
    for padded in (True, False):  # False: the CPU default (m.batch_prefill), one prompt at a time
        batch = m.hidden_states_many(jobs, padded=padded)
        assert [tuple(b.shape) for b in batch] == [tuple(s.shape) for s in single]
        for b, s in zip(batch, single):
            torch.testing.assert_close(b, s, atol=1e-4, rtol=1e-4)
    assert m.batch_prefill is False  # tests run on a CPU


def test_batched_messages_equal_one_by_one(tiny_source):
    m = tiny_source
    jobs = [(m.source_ids("the red car is parked in Oslo", "Where?"), 6), (m.source_ids("a", "Who?"), 3)]
    single = [m.write_message(*j) for j in jobs]
    batch = m.write_messages(jobs)
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [len(b.token_ids) for b in batch] == [6, 3]


def test_length_groups_bound_the_padding():
    from latentwire.runtime import length_groups

    lengths = [300, 40, 42, 310, 45, 41]
    groups = length_groups(list("abcdef"), lengths)
    assert sorted(x for g in groups for x in g) == list("abcdef")
    assert sorted(map(sorted, groups)) == [["a", "d"], ["b", "c", "e", "f"]]
    by = dict(zip("abcdef", lengths))
    for g in groups:
        assert max(by[x] for x in g) * len(g) <= 1.25 * sum(by[x] for x in g)


def test_length_groups_keep_within_a_token_budget():
    from latentwire.runtime import length_groups

    lengths = [100, 100, 101, 102, 103, 300]
    groups = length_groups(list(range(6)), lengths, max_tokens=250)
    assert sorted(x for g in groups for x in g) == list(range(6))
    assert all(max(lengths[i] for i in g) * len(g) <= 250 or len(g) == 1 for g in groups)
    assert [len(g) for g in groups] == [2, 2, 1, 1]  # without the budget: [5, 1]
    assert [len(g) for g in length_groups(list(range(6)), lengths)] == [5, 1]


def test_a_token_budget_splits_a_batch_without_changing_its_answers(tiny_target):
    """batch_tokens (max_batch_tokens in AgentSettings) runs one big batch as several smaller ones."""
    m = tiny_target
    jobs = [(torch.randn(6, m.hidden_size) * 0.05, "Who?", 4) for _ in range(4)]
    whole = m.answer_batch(jobs)
    calls = []
    prompt = len(m.target_inputs(*jobs[0][:2])[0])
    capped = AgentModel(m.profile, model=m.model, tokenizer=m.tok, batch_tokens=2 * prompt)
    run = capped.engine.generate_batch
    capped.engine.generate_batch = lambda embeds, n: calls.append(len(embeds)) or run(embeds, n)
    split = capped.answer_batch(jobs)
    assert calls == [2, 2]  # two padded batches of two instead of one of four
    assert [s.token_ids for s in split] == [w.token_ids for w in whole]


def test_a_compressed_cache_answers_a_batch_one_by_one(tiny_target):
    """FMKVC-style caches hold one sequence: a batch is answered in turn, each as it would be alone."""
    from compression.cache import factory

    m = AgentModel(tiny_target.profile, model=tiny_target.model, tokenizer=tiny_target.tok,
                   cache_factory=factory(profile="tiny-mistral", method="mean_pool", window=4, sink=2, recent=8))
    context = " ".join(["The red key is kept in Lisbon by Alice."] * 4)
    jobs = [(context, "Where is the key?", 4), (None, "Who?", 3)]
    single = [m.answer(*j) for j in jobs]
    batch = m.answer_batch(jobs)
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    dense = tiny_target.answer(*jobs[0])
    assert batch[0].cache_tokens < dense.cache_tokens  # the compressed cache was used


@pytest.mark.parametrize("which", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_bfloat16_prefill_fills_a_float32_cache_and_keeps_float32_logits(which, tiny_source, tiny_target):
    """prefill_dtype bfloat16: a bfloat16 copy of the decoder reads all prompt tokens but the last;
    the cache it leaves is float32, the last token and decoding run in float32, and the logits stay
    within bfloat16's rounding of the float32 prefill (Gemma 3: past its 64-token sliding window)."""
    from transformers import DynamicCache

    from tests.conftest import tiny_gemma3

    base = {"tiny-llama": tiny_source, "tiny-mistral": tiny_target}.get(which)
    model = base.model if base else tiny_gemma3()
    tok = base.tok if base else tiny_target.tok
    ref = AgentModel(which if base else "tiny-mistral", model=model, tokenizer=tok)
    fast = AgentModel(ref.profile, model=model, tokenizer=tok, prefill_dtype="bfloat16")
    assert ref.prefill_dtype == torch.float32 and ref.engine.prefill_model is None
    assert fast.prefill_dtype == torch.bfloat16
    assert {p.dtype for p in fast.engine.prefill_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the served model is untouched
    assert model.get_input_embeddings() is not None  # and the copy has no second table:
    assert not any(isinstance(mod, torch.nn.Embedding) for mod in fast.engine.prefill_model.modules())

    torch.manual_seed(0)
    n = 90
    table = model.get_input_embeddings()
    x = table(torch.randint(table.num_embeddings, (1, n))).detach()  # token embeddings as inputs
    mask, pos = torch.ones(1, n, dtype=torch.long), torch.arange(n)[None]
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    with torch.no_grad():
        want = ref.engine.prefill(x, mask, pos, caches[0]).logits[0, -1]
        got = fast.engine.prefill(x, mask, pos, caches[1]).logits[0, -1]
    assert got.dtype == torch.float32
    assert all(layer.keys.dtype == torch.float32 for layer in caches[1].layers)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == n
    err = (got - want).norm() / want.norm()
    assert 0 < err < 0.05, err  # bfloat16 ran (not bit-identical) and stayed close
    assert got.argmax() == want.argmax()


def test_prefill_dtype_is_checked(tiny_target, monkeypatch):
    from compression.cache import factory

    m = tiny_target
    with pytest.raises(ValueError, match="float32, bfloat16 or auto"):
        AgentModel(m.profile, model=m.model, tokenizer=m.tok, prefill_dtype="float16")
    compressed = factory(profile="tiny-mistral", method="mean_pool", window=4, sink=2, recent=8)
    with pytest.raises(ValueError, match="dense cache"):
        AgentModel(m.profile, model=m.model, tokenizer=m.tok, cache_factory=compressed, prefill_dtype="bfloat16")
    for amx, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert AgentModel(m.profile, model=m.model, tokenizer=m.tok, prefill_dtype="auto").prefill_dtype == want
        # a compressed cache keeps its model's dtype whatever the hardware
        assert AgentModel(m.profile, model=m.model, tokenizer=m.tok, cache_factory=compressed,
                          prefill_dtype="auto").prefill_dtype == torch.float32
    # auto never makes a copy that would crowd the host's memory
    import psutil

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Mem", (), {"available": 1024})())
    assert AgentModel(m.profile, model=m.model, tokenizer=m.tok, prefill_dtype="auto").prefill_dtype == torch.float32
