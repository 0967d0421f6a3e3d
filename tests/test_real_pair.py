"""The embedded pair (SmolLM2-135M -> Gemma-3-270M) served from deploy/local.yaml, over real gRPC."""

import pytest

from services.demo import DEMO_ITEMS
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    from services import local
    from services.client import LatentWireClient

    cfg = local.with_port(local.load_config(), free_port(), free_port())
    local.deploy(cfg, address="local", ray_init=dict(num_cpus=2, object_store_memory=300 * 1024**2, log_to_driver=False))
    try:
        with LatentWireClient(local.grpc_address(cfg), timeout_s=300) as c:
            yield c
    finally:
        local.shutdown()


def test_direct_mode_reads_the_context(client):
    context, question, expected = DEMO_ITEMS[0]
    reply = client.ask(context, question, "direct", max_new_tokens=8)
    assert expected in reply.answer


def test_text_relay_passes_the_fact_on(client):
    context, question, expected = DEMO_ITEMS[0]
    reply = client.ask(context, question, "text", max_new_tokens=8)
    assert 0 < reply.message_tokens <= 64 and reply.timings.source_decode_ms > 0
    assert expected in reply.answer


def test_latent_mode_runs_end_to_end_with_the_packaged_bridge(client):
    context, question, _ = DEMO_ITEMS[1]
    reply = client.ask(context, question, "latent", max_new_tokens=8)
    assert reply.answer and reply.target_model == "gemma3-270m" and reply.source_model == "smollm2-135m"
    assert reply.timings.bridge_ms > 0 and reply.message_tokens > 0
    # the context tokens' hidden states (T x 576) in bf16, then one soft token each (T x 640) in bf16
    assert 0 < reply.message_tokens < reply.source_tokens
    assert reply.packet_bytes >= reply.message_tokens * (576 + 640) * 2


def test_a_long_context_travels_as_at_most_m_soft_tokens_and_the_target_prefills_only_those(client):
    """~700 tokens of prose with planted records: LATENT and EXTRACT send M = 64 tokens, and the
    target's cache holds the primer, the packet, the question and the answer, not the context."""
    from bridge.records import generate

    item = generate(1, "val", seed=3, tokens=700)[0]
    direct = client.ask(item["context"], item["question"], "direct", max_new_tokens=8)
    latent = client.ask(item["context"], item["question"], "latent", max_new_tokens=8)
    extract = client.ask(item["context"], item["question"], "extract", max_new_tokens=8)
    assert latent.source_tokens > 700 and latent.message_tokens == extract.message_tokens == 64
    assert latent.packet_bytes < 64 * (576 + 640) * 2 + 4096  # states in, soft tokens out, bf16
    assert direct.kv_cache_tokens > 700 and latent.kv_cache_tokens < 64 + 80 and extract.kv_cache_tokens < 64 + 120
    assert latent.timings.target_prefill_ms < direct.timings.target_prefill_ms


def test_latent_packets_carry_the_facts_of_the_demo_items(client):
    """The packaged bridge passes each demo item's fact on (the Perceiver bridge of docs/bridge.md's
    table, held-out EM 0.14, got none of them)."""
    for context, question, expected in DEMO_ITEMS:
        reply = client.ask(context, question, "latent", max_new_tokens=8)
        assert expected.lower() in reply.answer.lower(), (question, reply.answer)


def test_the_packaged_bridge_searches_token_ids_it_does_not_list_in_the_whole_vocabulary(client):
    """Over gRPC, with the packaged bridge and its token index: ids past the source vocabulary are a
    hint the index cannot use, so those rows get the soft tokens of a packet without ids."""
    import torch

    from latentwire import codec
    from protos.latentwire.v1 import latentwire_pb2 as pb

    torch.manual_seed(0)
    prov = pb.Provenance(source_model="smollm2-135m", source_layer=1, source_hidden_size=576, request_id="ids")
    hidden = codec.encode(torch.randn(5, 576))
    plain = client.translate(pb.HiddenStatePacket(hidden=hidden, provenance=prov))
    unlisted = client.translate(pb.HiddenStatePacket(hidden=hidden, provenance=prov, source_token_ids=[10**9] * 5))
    want, got = (codec.decode(r.latent.soft_tokens, ndim=2) for r in (plain, unlisted))
    assert want.shape == (5, 640)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_packaged_bridges_lexicon_brings_a_mistranslated_name_home(client):
    """Over gRPC: the map alone sends SmolLM2's `ĠHelena` to another name's row (the lexicon's reason,
    docs/bridge.md); with the packet's source token ids the bridge's lexicon gives `▁Helena` back."""
    import torch
    from transformers import AutoTokenizer

    from bridge.load import default_weights_path
    from latentwire import codec, profiles, weights
    from latentwire.runtime import AgentModel
    from protos.latentwire.v1 import latentwire_pb2 as pb

    source = AgentModel("smollm2-135m")
    ids = source.tokenize("The courier for the northern route is Helena Varga.")
    pos = source.tok.convert_ids_to_tokens(ids.tolist()).index("ĠHelena")
    hidden = codec.encode(source.hidden_states(ids, 1).float())
    prov = pb.Provenance(source_model="smollm2-135m", source_layer=1, source_hidden_size=576, request_id="lex")
    # the rows the bridge mixes: the target's input embeddings times its embedding scale
    scale = weights.load(default_weights_path(), kind="bridge")[1]["config"]["embed_scale"]
    table = profiles.input_embeddings("gemma3-270m").float() * scale
    target_tok = AutoTokenizer.from_pretrained(profiles.converted_dir(profiles.get_profile("gemma3-270m")))
    read = {}
    for name, extra in (("with ids", {"source_token_ids": ids.tolist()}), ("without", {})):
        reply = client.translate(pb.HiddenStatePacket(hidden=hidden, provenance=prov, **extra))
        soft = codec.decode(reply.latent.soft_tokens, ndim=2).float()
        read[name] = target_tok.convert_ids_to_tokens(int(torch.cdist(soft[pos:pos + 1], table).argmin()))
    assert read["with ids"] == "▁Helena" and read["without"] != "▁Helena"
