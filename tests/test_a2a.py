"""A2A v1 over the real served stack (tiny pair, auth on), spoken by a2a-sdk's own gRPC client.

The client is `a2a.client.transports.grpc.GrpcTransport` (the SDK's gRPC transport over its generated
stub); Serve's routing metadata (`application`) and the bearer token travel as its service
parameters. Every answer is compared with the latentwire `Ask` (or `Receive`) of the same request:
the A2A front door runs the same path, so the same greedy answer comes back.
"""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest
from a2a.client.client import ClientCallContext
from a2a.client.errors import A2AClientError
from a2a.client.transports.grpc import GrpcTransport
from a2a.types import a2a_pb2 as a2a
from google.protobuf import struct_pb2

from latentwire.envelope import MEDIA_TYPE, to_envelope
from protos.latentwire.v1 import latentwire_pb2 as pb
from tests.conftest import free_port
from tests.serve_cluster import RAY_INIT, tiny_config
from tests.test_service_grpc import CONTEXT, QUESTION, hidden_packet

TOKEN = secrets.token_hex(16)
INTERNAL = secrets.token_hex(16)  # the services' own hops: this test calls Translate and Receive with it
MODES = ["latent", "text", "extract", "direct", "none"]


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    cfg = tiny_config(tiny_bridge_path, free_port(), free_port(), token=TOKEN, internal_token=INTERNAL)
    local.deploy(cfg, address="local", ray_init=RAY_INIT)
    yield local.grpc_address(cfg)
    local.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    from services.client import LatentWireClient

    with LatentWireClient(cluster, timeout_s=60, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def hops(cluster):
    """A client holding the internal token, to call the bridge and target as the source does."""
    from services.client import LatentWireClient

    with LatentWireClient(cluster, timeout_s=60, token=INTERNAL) as c:
        yield c


def call(address: str, method: str, request, token: str | None = TOKEN, stream: bool = False):
    """One call through a fresh SDK transport (its aio channel belongs to this call's event loop)."""
    params = {"application": "source"}
    if token:
        params["authorization"] = f"Bearer {token}"
    ctx = ClientCallContext(service_parameters=params, timeout=60)

    async def run():
        transport = GrpcTransport(grpc.aio.insecure_channel(address), None)
        try:
            if stream:
                return [r async for r in getattr(transport, method)(request, context=ctx)]
            return await getattr(transport, method)(request, context=ctx)
        finally:
            await transport.close()

    return asyncio.run(run())


def message(*parts: a2a.Part, context_id: str = "", **metadata) -> a2a.SendMessageRequest:
    msg = a2a.Message(message_id=secrets.token_hex(8), role=a2a.ROLE_USER, context_id=context_id, parts=parts)
    msg.metadata.update(metadata)
    return a2a.SendMessageRequest(message=msg)


def data(**fields) -> a2a.Part:
    value = struct_pb2.Value()
    value.struct_value.update(fields)
    return a2a.Part(data=value)


def ask(mode: str, **metadata) -> a2a.SendMessageRequest:
    return message(a2a.Part(text=QUESTION), data(context=CONTEXT), **{"mode": mode, "max_new_tokens": 5, **metadata})


def answer_of(task: a2a.Task) -> tuple[str, dict]:
    from google.protobuf import json_format

    (artifact,) = task.artifacts
    text, info = artifact.parts
    return text.text, json_format.MessageToDict(info.data)


def refused(err) -> tuple[grpc.StatusCode, str]:
    cause = err.value.__cause__
    assert isinstance(err.value, A2AClientError) and isinstance(cause, grpc.aio.AioRpcError), err.value
    return cause.code(), cause.details()


# ---- the card --------------------------------------------------------------------------------------
def test_the_card_names_the_grpc_interface_the_skills_and_the_bearer_scheme(cluster):
    card = call(cluster, "get_extended_agent_card", a2a.GetExtendedAgentCardRequest())
    assert card.name == "latentwire-tiny-llama" and card.capabilities.streaming
    (iface,) = card.supported_interfaces
    assert iface.protocol_binding == "GRPC" and iface.protocol_version == "1.0" and iface.url == cluster
    assert {s.id for s in card.skills} == {"ask", "receive-latent-packet"} and MEDIA_TYPE in card.default_input_modes
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert [set(r.schemes) for r in card.security_requirements] == [{"bearer"}]  # auth is on here


# ---- every mode, unary and streaming -------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_send_message_answers_in_every_mode_as_ask_does(cluster, client, mode):
    task = call(cluster, "send_message", ask(mode)).task
    text, info = answer_of(task)
    want = client.ask(CONTEXT, QUESTION, mode, max_new_tokens=5)
    assert task.status.state == a2a.TASK_STATE_COMPLETED and task.id and task.context_id
    assert text == want.answer and 0 < info["answer_tokens"] <= 5
    assert info["mode"] == mode.upper() and info["target_model"] == "tiny-mistral" and info["request_id"] == task.id
    assert info["message_tokens"] == want.message_tokens and info["packet_bytes"] == want.packet_bytes
    assert info["timings"]["target_prefill_ms"] > 0 and "bridge_ms" in info["timings"]
    assert task.history[0].parts[0].text == QUESTION


@pytest.mark.parametrize("mode", MODES)
def test_send_streaming_message_streams_the_answer_then_the_completed_task(cluster, client, mode):
    events = call(cluster, "send_message_streaming", ask(mode), stream=True)
    first, *updates, last = events
    assert first.task.status.state == a2a.TASK_STATE_WORKING
    assert last.task.status.state == a2a.TASK_STATE_COMPLETED and last.task.id == first.task.id
    assert updates and all(u.HasField("artifact_update") for u in updates)
    assert [u.artifact_update.append for u in updates] == [False] + [True] * (len(updates) - 1)
    text, info = answer_of(last.task)
    assert "".join(u.artifact_update.artifact.parts[0].text for u in updates).strip() == text
    assert text == client.ask(CONTEXT, QUESTION, mode, max_new_tokens=5).answer and info["mode"] == mode.upper()


def test_the_context_may_be_a_second_text_part_and_metadata_sets_the_budget(cluster, client):
    req = message(a2a.Part(text=QUESTION), a2a.Part(text=CONTEXT), mode="extract", message_tokens=4,
                  max_new_tokens=3)
    text, info = answer_of(call(cluster, "send_message", req).task)
    want = client.ask(CONTEXT, QUESTION, "extract", max_new_tokens=3, message_tokens=4)
    assert info["message_tokens"] == 4 and text == want.answer


def test_latent_is_the_default_mode_and_the_context_id_is_passed_through(cluster):
    req = message(a2a.Part(text=QUESTION), data(context=CONTEXT), context_id="conversation-7", max_new_tokens=3)
    task = call(cluster, "send_message", req).task
    assert answer_of(task)[1]["mode"] == "LATENT" and task.context_id == "conversation-7"


# ---- tasks -----------------------------------------------------------------------------------------
def test_get_task_returns_a_finished_task_and_cancel_refuses_it(cluster):
    task = call(cluster, "send_message", ask("none")).task
    assert call(cluster, "get_task", a2a.GetTaskRequest(id=task.id)) == task
    with pytest.raises(A2AClientError) as err:
        call(cluster, "cancel_task", a2a.CancelTaskRequest(id=task.id))
    code, details = refused(err)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "completed" in details
    for method, req in [("get_task", a2a.GetTaskRequest(id="nope")), ("cancel_task", a2a.CancelTaskRequest(id="nope"))]:
        with pytest.raises(A2AClientError) as err:
            call(cluster, method, req)
        code, details = refused(err)
        assert code == grpc.StatusCode.NOT_FOUND and details.startswith("id:") and "nope" in details


# ---- a packet from Translate through the envelope part: the receive path ---------------------------
def test_a_translated_packet_in_an_envelope_part_answers_as_receive_does(cluster, hops):
    latent = hops.translate(hidden_packet()).latent  # signed by the bridge; the envelope carries it
    want = hops.receive(pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION, max_new_tokens=5, latent=latent))
    packet = a2a.Part(raw=to_envelope(latent), media_type=MEDIA_TYPE)
    req = message(a2a.Part(text=QUESTION), packet, max_new_tokens=5, target_agent="default")
    text, info = answer_of(call(cluster, "send_message", req).task)
    assert text == want.answer and info["answer_tokens"] == want.answer_tokens > 0
    assert info["target_model"] == "tiny-mistral" and info["packet_decode_ms"] > 0
    *_, last = events = call(cluster, "send_message_streaming", req, stream=True)
    streamed = "".join(e.artifact_update.artifact.parts[0].text for e in events if e.HasField("artifact_update"))
    assert streamed.strip() == answer_of(last.task)[0] == want.answer


def test_an_envelope_for_another_target_is_refused_as_receive_refuses_it(cluster, hops):
    latent = hops.translate(hidden_packet()).latent
    latent.provenance.target_model = "mistral-7b-v0.3"
    req = message(a2a.Part(text=QUESTION), a2a.Part(raw=to_envelope(latent), media_type=MEDIA_TYPE))
    with pytest.raises(A2AClientError) as err:
        call(cluster, "send_message", req)
    code, details = refused(err)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "latent.provenance.target_model" in details


def test_an_envelope_without_the_bridge_signature_is_refused(cluster, hops):
    latent = hops.translate(hidden_packet()).latent
    latent.signature = b""
    req = message(a2a.Part(text=QUESTION), a2a.Part(raw=to_envelope(latent), media_type=MEDIA_TYPE))
    with pytest.raises(A2AClientError) as err:
        call(cluster, "send_message", req)
    code, details = refused(err)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "latent.signature" in details


# ---- refusals --------------------------------------------------------------------------------------
def envelope_part(raw: bytes = b"\x81\xa1v\x02", media_type: str = MEDIA_TYPE) -> a2a.Part:
    return a2a.Part(raw=raw, media_type=media_type)


BAD = {
    "no parts": (message(), "INVALID_ARGUMENT", "message.parts"),
    "no text part": (message(data(context=CONTEXT)), "INVALID_ARGUMENT", "message.parts"),
    "three text parts": (message(*[a2a.Part(text=QUESTION)] * 3), "INVALID_ARGUMENT", "message.parts"),
    "data part not an object": (message(a2a.Part(text=QUESTION), a2a.Part(data=struct_pb2.Value(number_value=3))),
                                "INVALID_ARGUMENT", "message.parts[1].data"),
    "data part with an unknown key": (message(a2a.Part(text=QUESTION), data(contxt=CONTEXT)),
                                      "INVALID_ARGUMENT", "message.parts[1].data"),
    "context not a string": (message(a2a.Part(text=QUESTION), data(context=3)), "INVALID_ARGUMENT",
                             "message.parts[1].data.context"),
    "url part": (message(a2a.Part(text=QUESTION), a2a.Part(url="https://example.com/ctx.txt")),
                 "INVALID_ARGUMENT", "message.parts[1]"),
    "raw part of another media type": (message(a2a.Part(text=QUESTION), envelope_part(media_type="image/png")),
                                       "INVALID_ARGUMENT", "message.parts[1].media_type"),
    "envelope of another version": (message(a2a.Part(text=QUESTION), envelope_part(
        media_type="application/vnd.latentwire.packet+msgpack; version=2")), "INVALID_ARGUMENT",
        "message.parts[1].media_type"),
    "envelope not msgpack": (message(a2a.Part(text=QUESTION), envelope_part(b"\xc1")), "INVALID_ARGUMENT", "envelope"),
    "envelope of an unknown version": (message(a2a.Part(text=QUESTION), envelope_part()), "INVALID_ARGUMENT",
                                       "envelope"),
    "packet with a context": (message(a2a.Part(text=QUESTION), envelope_part(), data(context=CONTEXT)),
                              "INVALID_ARGUMENT", "message.parts"),
    "packet in text mode": (message(a2a.Part(text=QUESTION), envelope_part(), mode="text"), "INVALID_ARGUMENT",
                            "message.metadata.mode"),
    "unknown mode": (ask("telepathy"), "INVALID_ARGUMENT", "message.metadata.mode"),
    "mode not a string": (message(a2a.Part(text=QUESTION), mode=1), "INVALID_ARGUMENT", "message.metadata.mode"),
    "budget not an integer": (ask("latent", message_tokens=2.5), "INVALID_ARGUMENT",
                              "message.metadata.message_tokens"),
    "budget over the limit": (ask("latent", message_tokens=257), "INVALID_ARGUMENT", "message_tokens"),
    "max_new_tokens too large": (ask("text", max_new_tokens=33), "INVALID_ARGUMENT", "max_new_tokens"),
    "empty question": (message(a2a.Part(text=" "), data(context=CONTEXT)), "INVALID_ARGUMENT", "question"),
    "unknown target agent": (ask("direct", target_agent="bob"), "NOT_FOUND", "bob"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_messages_are_refused_with_the_field_named_then_a_good_one_answers(cluster, case, stream):
    req, code, words = BAD[case]
    with pytest.raises(A2AClientError) as err:
        call(cluster, "send_message_streaming" if stream else "send_message", req, stream=stream)
    got, details = refused(err)
    assert got == getattr(grpc.StatusCode, code) and words in details, details
    assert call(cluster, "send_message", ask("none")).task.status.state == a2a.TASK_STATE_COMPLETED


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
def test_a_missing_or_wrong_token_is_unauthenticated(cluster, token):
    for method, req, stream in [("send_message", ask("none"), False), ("send_message_streaming", ask("none"), True),
                                ("get_extended_agent_card", a2a.GetExtendedAgentCardRequest(), False)]:
        with pytest.raises(A2AClientError) as err:
            call(cluster, method, req, token=token, stream=stream)
        assert refused(err)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_operations_this_agent_does_not_offer_are_refused_clearly(cluster):
    with pytest.raises(A2AClientError) as err:
        call(cluster, "list_tasks", a2a.ListTasksRequest())
    code, details = refused(err)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "unsupported operation" in details
