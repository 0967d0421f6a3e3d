"""A source agent with `selection: {method: merge}` on a real local Ray cluster, over real gRPC, with
the tiny pair and a tiny aligned bridge: the hidden-state packet carries more rows than the budget,
the bridge merges them into at most M slots, and the target reads them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import free_port, tiny_aligned_bridge

CONTEXT = ("The archive keeps many notes about the harbour and its ships. Vera lives in Quito. "
           "The harbour master counts the boats every morning before the market opens. Omar is 51 years old. "
           "Nobody remembers when the lighthouse was painted last. Karin works as a florist.")
QUESTION = "How old is Omar?"
M = 8
OVERHEAD = 400  # provenance (model names, bridge id and sha256, request id, twice) and shapes


@pytest.fixture(scope="module")
def aligned_path(tmp_path_factory, tiny_source, tiny_target):
    bridge = tiny_aligned_bridge(tiny_source, tiny_target)
    path = tmp_path_factory.mktemp("aligned") / "aligned.safetensors"
    bridge.save(path)
    return path, bridge.bridge_id


@pytest.fixture(scope="module")
def cluster(aligned_path):
    from services import local

    path, bridge_id = aligned_path
    cfg = local.with_port(local.load_config(), free_port(), free_port())
    apps = {a["name"]: a for a in cfg["applications"]}
    apps["source"]["args"].update(profile="tiny-llama", source_layer=2, threads=1, message_tokens=M,
                                  selection={"method": "merge"},
                                  limits={"max_context_tokens": 512, "max_new_tokens": 32})
    apps["target"]["args"].update(profile="tiny-mistral", threads=1, accepted_bridges=[bridge_id],
                                  limits={"max_message_tokens": M})
    apps["bridge"]["args"].update(weights=str(path), weights_sha256=None)
    local.deploy(cfg, address="local", ray_init=dict(num_cpus=2, object_store_memory=200 * 1024**2, log_to_driver=False))
    yield local.grpc_address(cfg)
    local.shutdown()


def test_a_merging_source_sends_more_rows_and_the_target_reads_at_most_M_slots(client, tiny_source):
    from latentwire import merging  # noqa: F401  (registers `merge`, as the source agent does)
    from latentwire.selection import make_selector, plan_message

    plan = plan_message(tiny_source, CONTEXT, QUESTION, M, make_selector("merge"), state_layer=2)
    rows, slots = len(plan.positions), plan.num_slots
    assert slots <= M < rows  # the plan the source makes: more context tokens than slots
    reply = client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=4)
    assert reply.message_tokens == slots and reply.answer_tokens > 0 and reply.target_model == "tiny-mistral"
    # both packets, bf16 on the wire: every kept row's state (64) in, one soft token (96) per slot out;
    # besides them the rows' token ids, slots and weights (at most 10 bytes a row) and the provenance
    tensors = rows * 64 * 2 + slots * 96 * 2
    assert tensors < reply.packet_bytes < tensors + 10 * rows + OVERHEAD
    # EXTRACT has no slots: the same selector's text message is lexical's M tokens
    assert client.ask(CONTEXT, QUESTION, "extract", max_new_tokens=4).message_tokens == M


@pytest.mark.parametrize("slot_of, weight, field", [
    ([0, 1, 0], [1.0, 1.0, 1.0], "slot_of"),  # out of order
    ([0, 0, 1], [0.5, 0.4, 1.0], "slot_weight"),  # weights not summing to 1
    ([0, 1], [1.0, 1.0], "slot_of"),  # a slot_of missing (3 rows)
])
def test_the_served_bridge_refuses_slots_that_do_not_fit_then_serves(client, slot_of, weight, field):
    """The slot checks over real gRPC: INVALID_ARGUMENT naming the field, and the bridge still serves."""
    import grpc

    from latentwire import codec
    from protos.latentwire.v1 import latentwire_pb2 as pb

    def packet(**slots):
        prov = pb.Provenance(source_model="tiny-llama", source_layer=2, source_hidden_size=64, request_id="t")
        return pb.HiddenStatePacket(hidden=codec.encode(torch.randn(3, 64)), provenance=prov, **slots)

    with pytest.raises(grpc.RpcError) as err:
        client.translate(packet(slot_of=slot_of, slot_weight=weight))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    reply = client.translate(packet(slot_of=[0, 0, 1], slot_weight=[0.5, 0.5, 1.0]))
    assert tuple(reply.latent.soft_tokens.shape) == (2, 96)  # 3 rows, 2 slots
