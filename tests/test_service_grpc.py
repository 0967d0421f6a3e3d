"""The three Serve applications on a real local Ray cluster, over real gRPC, with the tiny pair.

Every refusal is checked for its status code and message, then a good request on the same
server must still succeed: bad input never kills a replica or changes its state.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from latentwire import codec
from protos.latentwire.v1 import latentwire_pb2 as pb
from tests.conftest import free_port

TINY_BRIDGE_ID = "tiny-llama@2->tiny-mistral/K4"
CONTEXT = "Alice keeps the red key in Lisbon."
# bytes of both packets besides their tensors: provenance (model names, bridge id and sha256, request
# id, twice), shapes, the rows' source token ids
PROTO_OVERHEAD = 400
QUESTION = "Where is the key?"


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    cfg = local.with_port(local.load_config(), free_port(), free_port())
    apps = {a["name"]: a for a in cfg["applications"]}
    apps["source"]["args"].update(profile="tiny-llama", source_layer=2, threads=1, message_tokens=8,
                                  limits={"max_context_tokens": 256, "max_new_tokens": 32})
    apps["target"]["args"].update(profile="tiny-mistral", threads=1, accepted_bridges=[TINY_BRIDGE_ID])
    apps["bridge"]["args"].update(weights=str(tiny_bridge_path), weights_sha256=None)  # not the packaged file
    # a second target whose KV cache is compressed (mean-pooling: needs no trained sidecar)
    pooled = {"name": "target-pooled", "route_prefix": "/target-pooled", "import_path": "services.app:agent_app",
              "args": dict(apps["target"]["args"], kv_compression={"method": "mean_pool", "window": 4, "sink": 2,
                                                                     "recent": 8})}
    cfg["applications"].append(pooled)
    apps["source"]["args"]["targets"]["pooled"] = {"app": "target-pooled", "bridge_app": "bridge"}
    local.deploy(cfg, address="local", ray_init=dict(num_cpus=2, object_store_memory=200 * 1024**2, log_to_driver=False))
    yield local.grpc_address(cfg)
    local.shutdown()


def good_ask(client) -> pb.AskReply:
    reply = client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=4)
    assert reply.answer_tokens > 0 and reply.target_model == "tiny-mistral"
    return reply


def test_every_application_reports_serving(client):
    assert {app: client.health(app) for app in ("source", "target", "bridge")} == dict.fromkeys(
        ("source", "target", "bridge"), "SERVING")


@pytest.mark.parametrize("mode", ["latent", "text", "extract", "direct", "none"])
def test_every_mode_answers_with_timings_and_bytes(client, mode, tiny_source):
    reply = client.ask(CONTEXT, QUESTION, mode, max_new_tokens=5)
    t = reply.timings
    assert reply.mode == pb.Mode.Value(mode.upper()) and 0 < reply.answer_tokens <= 5
    assert t.target_prefill_ms > 0 and t.source_total_ms >= t.target_prefill_ms + t.target_decode_ms
    if mode == "latent":
        assert reply.message_tokens == 4 and t.bridge_ms > 0 and t.source_prefill_ms > 0
        # the states of the M = 8 context tokens the source chose (8 x 64) in + soft tokens (4 x 96)
        # out, bf16 on the wire
        ids, span = tiny_source.source_prompt(CONTEXT, QUESTION)
        assert reply.source_tokens == len(ids) and span.stop - span.start > 8
        assert 8 * 64 * 2 < reply.packet_bytes - 4 * 96 * 2 < 8 * 64 * 2 + PROTO_OVERHEAD
    elif mode == "text":
        assert 0 < reply.message_tokens <= 8 and t.source_decode_ms > 0
    elif mode == "extract":  # the chosen context tokens as text: no generation, no bridge
        assert reply.message_tokens == 8 and t.source_decode_ms == 0 and t.bridge_ms == 0
        assert 0 < reply.packet_bytes < len(CONTEXT) + 64
    elif mode == "direct":
        assert reply.packet_bytes >= len(CONTEXT) and t.source_prefill_ms == 0
    else:
        assert reply.packet_bytes == 0 and t.source_prefill_ms == 0


def test_latent_with_an_empty_context_sends_the_prompt_within_the_budget(client, tiny_source):
    """No context tokens to send: the packet carries M of the prompt's states rather than nothing."""
    reply = client.ask("", QUESTION, "latent", max_new_tokens=3)
    ids, span = tiny_source.source_prompt("", QUESTION)
    assert (span.start, span.stop) == (0, len(ids)) and reply.source_tokens == len(ids) > 8
    assert reply.answer_tokens > 0 and 8 * 64 * 2 < reply.packet_bytes - 4 * 96 * 2 < 8 * 64 * 2 + PROTO_OVERHEAD


@pytest.mark.parametrize("budget", [2, 8, 16])
def test_the_message_budget_bounds_the_latent_packet_whatever_the_context_length(client, budget):
    """One budget M bounds every message: a context 4x longer sends no more hidden states."""
    sizes = [client.ask(" ".join([CONTEXT] * k), QUESTION, "latent", max_new_tokens=2, message_tokens=budget
                        ).packet_bytes for k in (1, 4)]
    # the same tensors; only the rows' source token ids (varints of 1-2 bytes here) may differ
    assert abs(sizes[0] - sizes[1]) <= budget
    assert all(budget * 64 * 2 < size - 4 * 96 * 2 < budget * 64 * 2 + PROTO_OVERHEAD for size in sizes)
    extract = client.ask(" ".join([CONTEXT] * 4), QUESTION, "extract", max_new_tokens=2, message_tokens=budget)
    assert extract.message_tokens == budget


def test_stream_yields_the_answer_token_by_token(client):
    chunks = list(client.ask_stream(CONTEXT, QUESTION, "latent", max_new_tokens=6))
    reply = chunks[-1].reply
    assert len(chunks) >= 2 and all(not c.HasField("reply") for c in chunks[:-1])
    assert "".join(c.text for c in chunks[:-1]).strip() == reply.answer


def test_same_request_id_gets_the_same_reply(client):
    a = client.ask(CONTEXT, QUESTION, "text", max_new_tokens=4, request_id="retry-1")
    b = client.ask(CONTEXT, QUESTION, "text", max_new_tokens=4, request_id="retry-1")
    assert a == b and a.request_id == "retry-1"


def test_concurrent_asks_share_forward_passes(client):
    """Asks in flight together are answered by shared forwards (services.batching) at each stage."""
    from concurrent.futures import ThreadPoolExecutor

    names = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana"]
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda n: client.ask(f"{n} keeps the red key in Lisbon.", QUESTION, "latent",
                                                     max_new_tokens=4), names))
    batches = {f: [getattr(r.timings, f) for r in replies] for f in ("source_batch", "bridge_batch", "target_batch")}
    assert all(r.answer_tokens > 0 for r in replies)
    assert all(1 <= b <= len(names) for v in batches.values() for b in v), batches
    assert max(batches["source_batch"]) >= 2 and max(batches["target_batch"]) >= 2, batches
    # a request alone reports batches of 1
    t = client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=4).timings
    assert (t.source_batch, t.bridge_batch, t.target_batch) == (1, 1, 1)


# ---- refusals -----------------------------------------------------------------------------------
def hidden_packet(rows=6, dim=64, **prov) -> pb.HiddenStatePacket:
    p = dict(source_model="tiny-llama", source_layer=2, source_hidden_size=64, request_id="t")
    p.update(prov)
    return pb.HiddenStatePacket(hidden=codec.encode(torch.randn(rows, dim)), provenance=pb.Provenance(**p))


def latent_request(soft=None, **prov) -> pb.ReceiveRequest:
    p = dict(target_model="tiny-mistral", target_hidden_size=96, bridge_id=TINY_BRIDGE_ID)
    p.update(prov)
    soft = codec.encode(torch.randn(4, 96)) if soft is None else soft
    return pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION, max_new_tokens=3,
                             latent=pb.LatentPacket(soft_tokens=soft, provenance=pb.Provenance(**p)))


def nan_tensor():
    t = codec.encode(torch.randn(6, 64))
    t.data = torch.full((6, 64), float("nan"), dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    return t


def with_hidden(tensor):
    pkt = hidden_packet()
    pkt.hidden.CopyFrom(tensor)
    return pkt


BAD = {
    "empty question": (lambda c: c.ask(CONTEXT, "  ", "latent"), "INVALID_ARGUMENT", "question"),
    "context over the limit": (lambda c: c.ask("lisbon " * 400, QUESTION, "latent"), "RESOURCE_EXHAUSTED", "256"),
    "max_new_tokens too large": (lambda c: c.ask(CONTEXT, QUESTION, "text", max_new_tokens=33),
                                 "INVALID_ARGUMENT", "max_new_tokens"),
    "message budget over the limit": (lambda c: c.ask(CONTEXT, QUESTION, "latent", message_tokens=257),
                                      "INVALID_ARGUMENT", "message_tokens"),
    "unknown agent": (lambda c: c.ask(CONTEXT, QUESTION, "latent", target_agent="bob"), "NOT_FOUND", "bob"),
    "unknown mode": (lambda c: c.ask(request=pb.AskRequest(question=QUESTION, mode=7)), "INVALID_ARGUMENT", "mode"),
    "bad request id": (lambda c: c.ask(CONTEXT, QUESTION, request_id="a b/c"), "INVALID_ARGUMENT", "request_id"),
    "unknown application": (lambda c: c.agent.Ask(pb.AskRequest(question=QUESTION),
                                                  metadata=(("application", "nobody"),)), "NOT_FOUND", ""),
    "Ask on the bridge app": (lambda c: c.agent.Ask(pb.AskRequest(question=QUESTION),
                                                    metadata=(("application", "bridge"),)), "UNIMPLEMENTED", "source"),
    "Receive on the bridge app": (lambda c: c.receive(latent_request(), app="bridge"), "UNIMPLEMENTED", "target"),
    "Translate on the source app": (lambda c: c.translate(hidden_packet(), app="source"), "UNIMPLEMENTED",
                                    "bridge's application"),
    "Translate on the target app": (lambda c: c.translate(hidden_packet(), app="target"), "UNIMPLEMENTED",
                                    "bridge's application"),
    "Ask on the target app": (lambda c: c.agent.Ask(pb.AskRequest(question=QUESTION),
                                                    metadata=(("application", "target"),)), "UNIMPLEMENTED",
                              "source agent's application"),
    "AskStream on the target app": (lambda c: list(c.agent.AskStream(pb.AskRequest(question=QUESTION),
                                                                     metadata=(("application", "target"),))),
                                    "UNIMPLEMENTED", "source agent's application"),
    "AskStream on the bridge app": (lambda c: list(c.agent.AskStream(pb.AskRequest(question=QUESTION),
                                                                     metadata=(("application", "bridge"),))),
                                    "UNIMPLEMENTED", "source agent's application"),
    "ReceiveStream on the bridge app": (lambda c: list(c.agent.ReceiveStream(latent_request(),
                                                                             metadata=(("application", "bridge"),))),
                                        "UNIMPLEMENTED", "target agent's application"),
    "hidden wrong ndim": (lambda c: c.translate(with_hidden(codec.encode(torch.randn(1, 6, 64)))),
                          "INVALID_ARGUMENT", "hidden.shape"),
    "hidden wrong width": (lambda c: c.translate(hidden_packet(dim=65)), "INVALID_ARGUMENT", "hidden.shape"),
    "source token ids not one per row": (lambda c: c.translate(pb.HiddenStatePacket(
        hidden=hidden_packet().hidden, provenance=hidden_packet().provenance, source_token_ids=[1, 2, 3])),
        "INVALID_ARGUMENT", "source_token_ids"),
    "source token id negative": (lambda c: c.translate(pb.HiddenStatePacket(
        hidden=hidden_packet().hidden, provenance=hidden_packet().provenance, source_token_ids=[3, 1, -1, 4, 1, 5])),
        "INVALID_ARGUMENT", "source_token_ids"),
    "hidden wrong dtype": (lambda c: c.translate(with_hidden(pb.Tensor(shape=[6, 64], dtype=0, data=b"\0" * 768))),
                           "INVALID_ARGUMENT", "hidden.dtype"),
    "hidden wrong byte length": (lambda c: c.translate(with_hidden(pb.Tensor(shape=[6, 64], dtype=pb.BFLOAT16,
                                                                             data=b"\0" * 700))),
                                 "INVALID_ARGUMENT", "hidden.data"),
    "hidden NaN": (lambda c: c.translate(with_hidden(nan_tensor())), "INVALID_ARGUMENT", "NaN"),
    "hidden from another model": (lambda c: c.translate(hidden_packet(source_model="llama-3.1-8b")),
                                  "FAILED_PRECONDITION", "provenance.source_model"),
    "hidden from another layer": (lambda c: c.translate(hidden_packet(source_layer=3)),
                                  "FAILED_PRECONDITION", "provenance.source_layer"),
    "latent for another target": (lambda c: c.receive(latent_request(target_model="mistral-7b-v0.3")),
                                  "FAILED_PRECONDITION", "target_model"),
    "latent of another width": (lambda c: c.receive(latent_request(target_hidden_size=4096)),
                                "FAILED_PRECONDITION", "target_hidden_size"),
    "latent from an unknown bridge": (lambda c: c.receive(latent_request(bridge_id="rogue")),
                                      "FAILED_PRECONDITION", "bridge_id"),
    "latent Inf": (lambda c: c.receive(latent_request(soft=codec.encode(torch.full((4, 96), float("inf")), "float32"))),
                   "INVALID_ARGUMENT", "NaN or Inf"),
    "latent over the message budget": (lambda c: c.receive(latent_request(soft=codec.encode(torch.randn(257, 96)))),
                                       "RESOURCE_EXHAUSTED", "latent.soft_tokens.shape"),
    "extract without its text": (lambda c: c.receive(pb.ReceiveRequest(mode=pb.EXTRACT, question=QUESTION)),
                                 "INVALID_ARGUMENT", "payload"),
    "payload does not fit the mode": (lambda c: c.receive(pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION,
                                                                            text=pb.TextPacket(text="hi"))),
                                      "INVALID_ARGUMENT", "payload"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_clearly_then_a_good_request_succeeds(client, case):
    call, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == getattr(grpc.StatusCode, code), err.value.details()
    assert words in err.value.details()
    good_ask(client)


def test_direct_receive_of_a_good_latent_packet_answers(client):
    reply = client.receive(latent_request())
    assert reply.answer_tokens > 0 and reply.packet_decode_ms > 0


def test_cli_ask_prints_json(cluster):
    out = subprocess.run([sys.executable, "-m", "latentwire.cli", "ask", "--address", cluster, "--mode", "direct",
                          "--context", CONTEXT, "--question", QUESTION, "--max-new-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    reply = json.loads(out.stdout)
    assert reply["mode"] == "DIRECT" and reply["answer_tokens"] > 0 and "target_prefill_ms" in reply["timings"]


def test_cli_ask_reports_a_refusal_with_its_status(cluster):
    out = subprocess.run([sys.executable, "-m", "latentwire.cli", "ask", "--address", cluster, "--question", " "],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "question" in out.stderr


def test_bench_compares_modes_side_by_side_and_writes_json_and_plot(cluster, tmp_path):
    from services import bench

    report = bench.run_bench(cluster, requests=3, concurrency=[1, 2], context_tokens=[64], modes=["latent", "text"],
                             targets=[""], max_new_tokens=3, message_tokens=8, warmup=1, repeats=3)
    bench.write(report, tmp_path / "b.json", tmp_path / "b.png")
    s = json.loads((tmp_path / "b.json").read_text())
    first = s["settings"][0]["summary"]
    assert first["errors"] == 0 and set(first["modes"]) == {"latent/default", "text/default"}
    assert first["modes"]["latent/default"]["n"] == 3 and first["modes"]["text/default"]["message_tokens"] > 0
    assert len(first["speedup_latent_vs_text"]["default"]["per_repeat"]) == 3
    assert "2" not in s["throughput_scaling"] and s["throughput_scaling"]["64"]["to"] == 2
    assert (tmp_path / "b.png").stat().st_size > 10_000 and s["hardware"]["cpus"] >= 1
    assert "LATENT vs TEXT" in bench.table(report)
    assert first["modes"]["latent/default"]["batch_mean"]["target_batch"] >= 1
    assert first["modes"]["text/default"]["batch_mean"]["bridge_batch"] == 0  # TEXT skips the bridge
    recs = s["settings"][0]["records"]
    assert all(isinstance(r["correct"], bool) for r in recs)  # each reply checked against its planted fact
    assert first["modes"]["latent/default"]["exact_match"] == sum(
        r["correct"] for r in recs if r["mode"] == "latent") / 3


def test_a_target_configured_with_kv_compression_keeps_a_smaller_cache(client):
    context = " ".join(["The red key is kept in Lisbon by Alice."] * 6)
    dense = client.ask(context, QUESTION, "direct", max_new_tokens=4)
    pooled = client.ask(context, QUESTION, "direct", max_new_tokens=4, target_agent="pooled")
    assert pooled.target_agent == "pooled" and pooled.answer_tokens > 0
    # sink 2 + recent 8 dense, every older window of 4 pooled into 1 entry
    assert dense.kv_cache_tokens > 40 and pooled.kv_cache_tokens < 0.5 * dense.kv_cache_tokens
