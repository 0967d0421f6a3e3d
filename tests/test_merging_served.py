"""A source agent with `selection: {method: merge}` on a real local Ray cluster, over real gRPC, with
the tiny pair and a tiny aligned bridge: the hidden-state packet carries more rows than the budget,
the bridge merges them into at most M slots, and the target reads them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import free_port

CONTEXT = ("The archive keeps many notes about the harbour and its ships. Vera lives in Quito. "
           "The harbour master counts the boats every morning before the market opens. Omar is 51 years old. "
           "Nobody remembers when the lighthouse was painted last. Karin works as a florist.")
QUESTION = "How old is Omar?"
M = 8
OVERHEAD = 400  # provenance (model names, bridge id and sha256, request id, twice) and shapes


@pytest.fixture(scope="module")
def aligned_path(tmp_path_factory, tiny_source, tiny_target):
    from bridge.align import AlignConfig, build_bridge, candidate_vocab, moments, solve

    torch.manual_seed(0)
    S, B = moments(torch.randn(50, tiny_source.hidden_size), torch.randn(50, tiny_target.hidden_size))
    bridge = build_bridge(tiny_source, tiny_target, AlignConfig(), 2, solve(S, B, 1.0),
                          candidate_vocab(tiny_source, tiny_target))
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
