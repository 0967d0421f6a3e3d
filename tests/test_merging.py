"""Slots that merge tokens (latentwire.merging): the `merge` selector's plan, the slots' contents, and
the bridge service's merge of a packet's rows into at most M soft tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from latentwire.errors import FailedPrecondition, InvalidArgument
from latentwire.merging import heavy, light, merge_slots, pair_slots
from latentwire.selection import extract_text, make_selector, plan_message, plan_messages
from tests.conftest import tiny_aligned_bridge

RECORDS = ("The archive keeps many notes about the harbour and its ships. Vera lives in Quito. "
           "The harbour master counts the boats every morning before the market opens. Omar is 51 years old. "
           "Nobody remembers when the lighthouse was painted last. Karin works as a florist. "
           "The ferry leaves twice a day when the weather allows it.")


def test_light_tokens_share_a_slot_and_numbers_and_names_never_do():
    tokens = ["ĠWalter", "Ġhas", "Ġa", "Ġdentist", "Ġappointment", "Ġon", "ĠFebruary", "Ġ", "8", ".", "Ġthe", "Ġroom"]
    slots = pair_slots(tokens, list(range(len(tokens))))
    assert [[tokens[i] for i in s] for s in slots] == [
        ["ĠWalter"], ["Ġhas", "Ġa"], ["Ġdentist"], ["Ġappointment", "Ġon"], ["ĠFebruary"], ["Ġ"], ["8"],
        [".", "Ġthe"], ["Ġroom"]]
    # `left`: a stop word joins the token before it, never the content word after it (an answer
    # such as a job follows "as a": it keeps its own slot)
    job = ["Ġliving", "Ġas", "Ġa", "Ġpainter"]
    assert pair_slots(job, [0, 1, 2, 3], left=True) == [[0, 1], [2], [3]]
    assert pair_slots(job, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    # only tokens adjacent in the context share a slot: a gap between runs keeps them apart
    assert pair_slots(["Ġof", "Ġthe"], [3, 7]) == [[0], [1]]
    assert light("Ġthe") and light(",") and not light("ĠThe") and not light("Ġ") and not light("7")
    assert heavy("ĠOmar") and heavy("5") and heavy("Ġ") and not heavy("Ġharbour")


def test_a_slot_is_the_weighted_mean_of_its_tokens_inside_the_simplex():
    soft = torch.eye(5)  # vertices of the simplex: one vocabulary row each
    slot_of, weight = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0.5, 0.5, 1.0, 0.25, 0.75])
    out = merge_slots(soft, slot_of, weight)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 0.25, 0.75]]))
    assert bool((out >= 0).all()) and torch.allclose(out.sum(-1), torch.ones(3))  # convex: still in the simplex
    assert merge_slots(soft, None, None) is soft  # no groups: one soft token per row, untouched
    with pytest.raises(ValueError, match="one soft token per row"):  # a Perceiver's K soft tokens are not rows
        merge_slots(torch.zeros(4, 5), slot_of, weight)


def test_the_merge_weight_is_the_light_tokens_share_and_is_bounded():
    with pytest.raises(ValueError, match="weight"):
        make_selector("merge", weight=1.0)
    sel = make_selector("merge", weight=0.25)
    from latentwire.selection import SourceView

    view = SourceView(ids=torch.zeros(4, dtype=torch.long), context=slice(0, 4), question=slice(0, 0),
                      tokens=["Ġroom", "Ġof", ",", "Ġthe"], question_text="")
    slots = pair_slots(view.tokens, [0, 1, 2, 3])
    assert slots == [[0, 1], [2, 3]]
    assert sel.slot_weights(view, [0, 1, 2, 3], slots) == [0.75, 0.25, 0.5, 0.5]  # two light tokens: halves


@pytest.mark.parametrize("budget", [4, 8, 16])
def test_a_merged_message_carries_more_tokens_in_at_most_M_slots(tiny_source, budget):
    sel = make_selector("merge")
    msg = plan_message(tiny_source, RECORDS, "How old is Omar?", budget, sel, state_layer=2)
    lexical = plan_message(tiny_source, RECORDS, "How old is Omar?", budget, make_selector("lexical"), state_layer=2)
    assert msg.num_slots <= budget < len(msg.positions) <= 2 * budget
    assert set(lexical.positions.tolist()) <= set(msg.positions.tolist())  # lexical's choice, and more of it
    pos, slot_of, weight = msg.positions.tolist(), msg.slot_of.tolist(), msg.slot_weight
    assert slot_of[0] == 0 and all(b - a in (0, 1) for a, b in zip(slot_of, slot_of[1:]))  # in order
    tokens = tiny_source.tok.convert_ids_to_tokens(msg.token_ids.tolist())
    for s in range(msg.num_slots):
        members = [i for i, x in enumerate(slot_of) if x == s]
        assert len(members) in (1, 2)
        assert weight[members].sum().item() == pytest.approx(1.0)
        if len(members) == 2:  # a pair: adjacent in the context, one light token, no digit or name
            assert pos[members[1]] == pos[members[0]] + 1
            assert any(light(tokens[i]) for i in members) and not any(heavy(tokens[i]) for i in members)
    # every kept token's state travels (the bridge merges their soft tokens, not the states)
    torch.testing.assert_close(msg.states, tiny_source.hidden_states(msg.ids, 2)[msg.positions], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no extractive text"):
        extract_text(tiny_source, msg)
    # a message without states is text (EXTRACT): no slots, lexical's at most M tokens
    text = plan_message(tiny_source, RECORDS, "How old is Omar?", budget, sel)
    assert text.slot_of is None and torch.equal(text.positions, lexical.positions)
    # the batched plans of a source agent plan the same slots
    batched = plan_messages(tiny_source, [(tiny_source.source_spans(RECORDS, "How old is Omar?"), "How old is Omar?",
                                           budget, 2)] * 2, sel)
    assert all(torch.equal(b.positions, msg.positions) and torch.equal(b.slot_of, msg.slot_of) for b in batched)


# ---- the bridge service merges a packet's rows ---------------------------------------------------
@pytest.fixture(scope="module")
def aligned_service(tmp_path_factory, tiny_source, tiny_target):
    from services.bridge_service import BridgeServicer

    bridge = tiny_aligned_bridge(tiny_source, tiny_target)
    path = tmp_path_factory.mktemp("aligned") / "aligned.safetensors"
    bridge.save(path)
    return BridgeServicer(dict(weights=str(path), threads=1, wire_dtype="float32"))


def _packet(svc, hidden, slot_of=(), slot_weight=()):
    from latentwire import codec
    from protos.latentwire.v1 import latentwire_pb2 as pb

    return pb.HiddenStatePacket(hidden=codec.encode(hidden, "float32"), slot_of=list(slot_of),
                                slot_weight=list(slot_weight), provenance=pb.Provenance(
                                    source_model=svc.cfg.source_model, source_layer=svc.cfg.source_layer,
                                    source_hidden_size=svc.cfg.d_src))


def test_the_bridge_service_sends_one_soft_token_per_slot(aligned_service):
    from latentwire import codec

    svc = aligned_service
    hidden = torch.randn(6, svc.cfg.d_src)
    slot_of, weight = [0, 0, 1, 2, 2, 3], [0.5, 0.5, 1.0, 0.25, 0.75, 1.0]
    reply = asyncio.run(svc.Translate(_packet(svc, hidden, slot_of, weight)))
    soft = codec.decode(reply.latent.soft_tokens)
    assert tuple(soft.shape) == (4, svc.cfg.d_tgt)  # 6 rows, 4 slots
    per_row = svc.translate_many([hidden])[0]
    torch.testing.assert_close(soft, torch.stack([0.5 * per_row[0] + 0.5 * per_row[1], per_row[2],
                                                  0.25 * per_row[3] + 0.75 * per_row[4], per_row[5]]),
                               rtol=1e-4, atol=1e-5)
    plain = codec.decode(asyncio.run(svc.Translate(_packet(svc, hidden))).latent.soft_tokens)
    assert tuple(plain.shape) == (6, svc.cfg.d_tgt)  # without slots: one per row, as before


@pytest.mark.parametrize("slot_of, weight, field", [
    ([0, 0, 1], [0.5, 0.5], "slot_weight"),  # a weight missing
    ([0, 1], [1.0, 1.0], "slot_of"),  # a slot_of missing (3 rows)
    ([0, 2, 2], [1.0, 0.5, 0.5], "slot_of"),  # a slot skipped
    ([0, 1, 0], [1.0, 1.0, 1.0], "slot_of"),  # out of order
    ([0, 0, 1], [0.5, 0.4, 1.0], "slot_weight"),  # weights not summing to 1
    ([0, 0, 1], [1.5, -0.5, 1.0], "slot_weight"),  # a negative weight
])
def test_the_bridge_service_refuses_slots_that_do_not_fit(aligned_service, slot_of, weight, field):
    svc = aligned_service
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(svc.Translate(_packet(svc, torch.randn(3, svc.cfg.d_src), slot_of, weight)))
    assert err.value.field == field


def test_a_bridge_without_one_soft_token_per_row_refuses_slots(tiny_bridge_path):
    from services.bridge_service import BridgeServicer

    svc = BridgeServicer(dict(weights=str(tiny_bridge_path), threads=1))  # the tiny Perceiver: K = 4 soft tokens
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(svc.Translate(_packet(svc, torch.randn(6, svc.cfg.d_src), [0, 0, 1, 1, 2, 3], [0.5] * 4 + [1.0] * 2)))
    assert err.value.field == "slot_of"


def test_a_target_with_a_cap_of_M_reads_M_slots_of_more_rows_and_refuses_more_soft_tokens(aligned_service):
    """The receiver's cap counts soft tokens (slots), not the context tokens merged into them."""
    from latentwire.errors import ResourceExhausted
    from protos.latentwire.v1 import latentwire_pb2 as pb
    from services.agent import AgentServicer

    svc = aligned_service
    target = AgentServicer(dict(profile="tiny-mistral", role="target", threads=1, limits=dict(max_message_tokens=4)))
    hidden = torch.randn(6, svc.cfg.d_src)
    merged = asyncio.run(svc.Translate(_packet(svc, hidden, [0, 0, 1, 2, 2, 3], [0.5, 0.5, 1.0, 0.5, 0.5, 1.0])))
    soft = target._payload(pb.ReceiveRequest(mode=pb.LATENT, question="Who?", latent=merged.latent))
    assert tuple(soft.shape) == (4, svc.cfg.d_tgt)
    unmerged = asyncio.run(svc.Translate(_packet(svc, hidden)))
    with pytest.raises(ResourceExhausted) as err:
        target._payload(pb.ReceiveRequest(mode=pb.LATENT, question="Who?", latent=unmerged.latent))
    assert err.value.field == "latent.soft_tokens.shape"


def test_eval_scores_merged_latent_beside_latent_and_extract(aligned_service, tiny_source, tiny_target, tmp_path):
    from bridge import budgets
    from bridge.records import generate

    items = generate(2, "val", seed=2, tokens=60, facts=2)
    result = budgets.evaluate(items, tiny_source, tiny_target, aligned_service.bridge, make_selector("lexical"),
                              budgets=[4, 8], baselines=(), max_new_tokens=2, nll=False, progress=False,
                              latent_selectors={"merge": make_selector("merge")})
    modes = result["modes"]
    assert set(modes) == {f"{k}@{b}" for k in ("latent", "extract", "latent-merge") for b in (4, 8)}
    for b in (4, 8):
        merged, plain = modes[f"latent-merge@{b}"], modes[f"latent@{b}"]
        assert merged["message_tokens"] <= b == plain["message_tokens"] == modes[f"extract@{b}"]["message_tokens"]
        assert plain["context_covered"] == b < merged["context_covered"]  # more context in no more slots
    assert budgets.plot(result, tmp_path / "em.png").stat().st_size > 5_000
    # a merging selector as the main one has no EXTRACT: its message has no text within the budget
    alone = budgets.evaluate(items, tiny_source, tiny_target, aligned_service.bridge, make_selector("merge"),
                             budgets=[4], baselines=(), max_new_tokens=2, nll=False, progress=False)
    assert set(alone["modes"]) == {"latent@4"}


def test_latent_selector_specs_name_their_parameters():
    from bridge.budgets import _selector_spec

    assert _selector_spec("merge") == ("merge", {})
    assert _selector_spec("merge:left=1;weight=0.25") == ("merge", {"left": 1, "weight": 0.25})
    with pytest.raises(ValueError, match="key=value"):
        _selector_spec("merge:left")
