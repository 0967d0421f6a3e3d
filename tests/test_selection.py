"""Packet selection (latentwire.selection): the source spends the message budget M, knowing the question."""

from __future__ import annotations

import pytest
import torch

from latentwire import merging, selection  # noqa: F401  (merging registers the `merge` selector)
from latentwire.selection import (SELECTORS, extract_text, make_selector, plan_message, plan_messages,
                                  question_attention, windows)

RECORDS = ("The archive keeps many notes about the harbour and its ships. Vera lives in Quito. "
           "The harbour master counts the boats every morning before the market opens. Omar is 51 years old. "
           "Nobody remembers when the lighthouse was painted last. Karin works as a florist. "
           "The ferry leaves twice a day when the weather allows it.")


def test_windows_keep_the_best_anchor_with_its_neighbours_in_context_order():
    scores = torch.full((20,), float("-inf"))
    scores[12], scores[3] = 2.0, 1.0
    assert windows(scores, 4, before=1, after=2) == [11, 12, 13, 14]
    assert windows(scores, 6, before=1, after=2) == [2, 3, 11, 12, 13, 14]


def test_windows_fill_the_budget_when_too_few_tokens_anchor():
    scores = torch.full((10,), float("-inf"))
    scores[8] = 1.0
    assert windows(scores, 5, before=0, after=0) == [0, 1, 2, 3, 8]


def test_every_selector_is_registered_and_unknown_parameters_are_named():
    assert {"prefix", "lexical", "attention", "merge"} <= set(SELECTORS.names())
    with pytest.raises(ValueError, match="wrong"):
        make_selector("lexical", wrong=3)
    with pytest.raises(KeyError, match="known: attention, lexical, merge, prefix"):
        make_selector("nope")


@pytest.mark.parametrize("budget", [1, 8, 16])
def test_a_message_holds_at_most_the_budget_and_the_states_of_its_tokens(tiny_source, budget):
    for name in SELECTORS.names():
        sel = make_selector(name, **({"needs_attention_layer": 2} if name == "attention" else {}))
        msg = plan_message(tiny_source, RECORDS, "How old is Omar?", budget, sel, state_layer=2)
        if sel.merges_slots:  # more tokens in at most M slots (tests/test_merging.py)
            assert msg.num_slots <= budget <= len(msg.positions)
        else:
            assert len(msg.positions) == msg.num_slots == budget
        assert bool((msg.positions >= msg.context.start).all() and (msg.positions < msg.context.stop).all())
        assert torch.equal(msg.positions, msg.positions.sort().values)  # in context order
        full = tiny_source.hidden_states(msg.ids, 2)
        torch.testing.assert_close(msg.states, full[msg.positions], rtol=1e-4, atol=1e-5)


def test_a_budget_above_the_context_keeps_every_context_token(tiny_source):
    msg = plan_message(tiny_source, "Vera lives in Quito.", "Where does Vera live?", 64, make_selector("lexical"))
    assert msg.positions.tolist() == list(range(msg.context.start, msg.context.stop))


def test_lexical_selection_keeps_the_record_of_the_asked_person(tiny_source):
    for question, answer in [("How old is Omar?", "51"), ("What is Karin's job?", "florist"),
                             ("Which city does Vera live in?", "Quito")]:
        msg = plan_message(tiny_source, RECORDS, question, 26, make_selector("lexical", after=24))  # tiny pieces: a wider window
        assert answer in extract_text(tiny_source, msg), (question, extract_text(tiny_source, msg))


def test_prefix_selection_is_truncation(tiny_source):
    msg = plan_message(tiny_source, RECORDS, "How old is Omar?", 10, make_selector("prefix"))
    assert msg.positions.tolist() == list(range(msg.context.start, msg.context.start + 10))


def test_question_attention_equals_the_models_own_attention_weights(tiny_source):
    """Recomputed from the layer's input (projections + rotary), the scores equal what eager
    attention returns as its weights, so they do not depend on the kernel."""
    ids, span, asked = tiny_source.source_spans(RECORDS, "How old is Omar?")
    model = tiny_source.model
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        out = model(input_ids=ids[None], output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    for layer in (1, 2):
        want = out.attentions[layer - 1][0, :, asked, span].mean(0).sum(0)
        got, _ = question_attention(tiny_source, ids, asked, span, layer)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_batched_plans_equal_one_at_a_time(tiny_source):
    sel = make_selector("lexical")
    jobs = [(tiny_source.source_spans(RECORDS, q), q, 8, 2) for q in ("How old is Omar?", "What is Karin's job?")]
    together = plan_messages(tiny_source, jobs, sel)
    for job, got in zip(jobs, together):
        alone = selection.plan_prompt(tiny_source, *job[:3], sel, job[3])
        assert torch.equal(got.positions, alone.positions)
        torch.testing.assert_close(got.states, alone.states, rtol=1e-4, atol=1e-5)


def test_extract_text_marks_left_out_text(tiny_source):
    msg = plan_message(tiny_source, RECORDS, "How old is Omar?", 6, make_selector("prefix"))
    assert " ... " not in extract_text(tiny_source, msg)
    msg.positions = torch.cat([msg.positions[:3], msg.positions[-2:] + 20])
    assert extract_text(tiny_source, msg).count(" ... ") == 1
