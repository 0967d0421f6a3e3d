"""Bearer-token authentication at the gRPC ingress, checked inside the deployments, and the bridge's
signatures on latent packets.

Unit tests of services.auth and services.signing here; the tests over real gRPC (class AuthOverGrpc:
no token or a wrong one is UNAUTHENTICATED on every application, the clients' token is refused on the
internal hops (bridge, target), a forged or altered packet is refused with the internal token, the
right tokens work end to end with the source sending the internal one on its hops) run in
tests/test_multinode.py on the cluster config, where auth is on by default and the tokens reach the
replicas only through their environment (one cluster fewer for the suite).
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import grpc
import pytest

from protos.latentwire.v1 import latentwire_pb2 as pb

from latentwire.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unimplemented
from latentwire.settings import AuthSettings
from services.auth import BearerAuth, Unauthenticated, served
from tests.serve_cluster import INTERNAL_TOKEN_ENV, TOKEN_ENV, replicas

TOKEN = secrets.token_hex(16)
INTERNAL = secrets.token_hex(16)
CONTEXT = "Alice keeps the red key in Lisbon."
QUESTION = "Where is the key?"


# ---- unit ------------------------------------------------------------------------------------------
def required(token=TOKEN, kind="source", internal=INTERNAL) -> BearerAuth:
    return BearerAuth(AuthSettings(required=True), kind=kind, environ={TOKEN_ENV: token, INTERNAL_TOKEN_ENV: internal})


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer wrong-token-0123456789")], [("authorization", f"Basic {TOKEN}")],
    [("authorization", "Bearer ")], [("authorization", TOKEN)], [("x-token", TOKEN)],
    [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")],
    [("authorization", f"Bearer {TOKEN}x")], [("authorization", f"Bearer {TOKEN[:-1]}")],
])
def test_anything_but_the_exact_bearer_token_is_unauthenticated(metadata):
    with pytest.raises(Unauthenticated) as err:
        required().check("Ask", metadata)
    assert err.value.code == "UNAUTHENTICATED" and TOKEN not in str(err.value)  # never echo the secret


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer   {TOKEN} "])
def test_the_bearer_token_is_accepted(value):
    required().check("Ask", [("application", "source"), ("Authorization", value)])


def test_auth_off_accepts_anything_and_sends_no_token_it_does_not_have():
    auth = BearerAuth(AuthSettings(), environ={})
    auth.check("Ask", [])
    auth.check("Receive", [])
    assert auth.metadata() == () and auth.packet_key is None


def test_a_service_requiring_auth_refuses_to_start_without_strong_distinct_tokens():
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        BearerAuth(AuthSettings(required=True), environ={INTERNAL_TOKEN_ENV: INTERNAL})
    for kind in ("source", "target", "bridge"):  # every app takes or sends the internal token
        with pytest.raises(RuntimeError, match=INTERNAL_TOKEN_ENV):
            BearerAuth(AuthSettings(required=True), kind=kind, environ={TOKEN_ENV: TOKEN})
    with pytest.raises(RuntimeError, match="at least 16"):
        required("short")
    with pytest.raises(RuntimeError, match="at least 16"):
        required(internal="short")
    with pytest.raises(RuntimeError, match="secret of its own"):
        required(internal=TOKEN)
    # the bridge and target serve no client: they start without the clients' token
    BearerAuth(AuthSettings(required=True), kind="bridge", environ={INTERNAL_TOKEN_ENV: INTERNAL})


def test_the_tokens_are_compared_in_constant_time(monkeypatch):
    import hmac

    calls = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    required().check("Ask", [("authorization", f"Bearer {TOKEN}")])
    assert calls == [(TOKEN.encode(), TOKEN.encode()), (TOKEN.encode(), INTERNAL.encode())]


def bearer(token):
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize("kind,method", [("bridge", "Translate"), ("target", "Receive"),
                                         ("target", "ReceiveStream"), ("source", "Receive")])
def test_internal_hops_take_the_internal_token_only(kind, method):
    auth = required(kind=kind)
    auth.check(method, bearer(INTERNAL))
    with pytest.raises(PermissionDenied) as err:
        auth.check(method, bearer(TOKEN))
    assert err.value.code == "PERMISSION_DENIED" and err.value.field == "authorization"
    assert "internal hop" in str(err.value) and INTERNAL_TOKEN_ENV in str(err.value) and TOKEN not in str(err.value)


@pytest.mark.parametrize("method", ["Ask", "AskStream", "SendMessage"])
def test_the_source_public_methods_take_the_clients_token_only(method):
    auth = required()
    auth.check(method, bearer(TOKEN))
    with pytest.raises(PermissionDenied, match="client's bearer token"):
        auth.check(method, bearer(INTERNAL))


@pytest.mark.parametrize("kind,method,where", [
    ("target", "Ask", "source agent"), ("target", "AskStream", "source agent"),
    ("target", "SendMessage", "source agent"), ("target", "Translate", "bridge"),
    ("bridge", "Ask", "source agent"), ("bridge", "AskStream", "source agent"),
    ("bridge", "ReceiveStream", "target agent"), ("source", "Translate", "bridge")])
@pytest.mark.parametrize("auth_on", [True, False])
def test_a_method_on_the_wrong_application_is_unimplemented_naming_where_it_is_served(kind, method, where, auth_on):
    auth = required(kind=kind) if auth_on else BearerAuth(AuthSettings(), kind=kind, environ={})
    for token in (TOKEN, INTERNAL):
        with pytest.raises(Unimplemented) as err:
            auth.check(method, bearer(token))
        assert err.value.field == "application" and where in str(err.value) and method in str(err.value)
    if auth_on:  # a caller with no valid token learns nothing about the routes
        with pytest.raises(Unauthenticated):
            auth.check(method, bearer("wrong-token-0123456789"))


def test_every_servicer_has_a_method_for_every_rpc_the_proxy_can_route_to_it():
    """Serve's proxy routes any registered RPC to any application and, finding no method of its name,
    answers with its own error listing the replica's methods; so each servicer has one for each RPC
    of every registered service, streaming where the RPC streams, and those its kind never serves
    refuse UNIMPLEMENTED naming where they are served (a target's are refused by `check`, above)."""
    import asyncio
    import inspect

    from services import a2a_wire
    from services.a2a import A2AAgentServicer
    from services.bridge_service import BridgeServicer

    rpcs = [m for service in (*pb.DESCRIPTOR.services_by_name.values(), a2a_wire.SERVICE) for m in service.methods]
    assert {m.name for m in rpcs} >= {"Ask", "Translate", "SendMessage", "SubscribeToTask"}
    for cls, kind in [(BridgeServicer, "bridge"), (A2AAgentServicer, "source")]:
        for m in rpcs:
            fn = getattr(cls, m.name)
            assert inspect.isasyncgenfunction(fn) == m.server_streaming, (cls.__name__, m.name)
            if served(kind, m.name) is not None:
                continue
            with pytest.raises(Unimplemented) as err:  # a direct call (no gRPC context) runs the body
                if m.server_streaming:
                    asyncio.run(anext(fn(None, None)))
                else:
                    asyncio.run(fn(None, None))
            assert err.value.field == "application" and m.name in str(err.value), (kind, m.name, err.value)


def test_an_agent_serves_the_methods_of_its_role():
    from latentwire.settings import AgentSettings, BridgeSettings

    assert BearerAuth.of(AgentSettings(profile="tiny-mistral", role="target")).kind == "target"
    assert BearerAuth.of(AgentSettings(profile="tiny-llama")).kind == "source"
    assert BearerAuth.of(BridgeSettings()).kind == "bridge"


# ---- packet signatures -----------------------------------------------------------------------------
def signed_packet(key, dtype="bfloat16"):
    import torch

    from latentwire import codec
    from protos.latentwire.v1 import latentwire_pb2 as pb
    from services import signing

    prov = pb.Provenance(request_id="r1", source_model="tiny-llama", source_layer=2, source_hidden_size=64,
                         target_model="tiny-mistral", target_hidden_size=96, bridge_id="b", bridge_sha256="a" * 64)
    packet = pb.LatentPacket(soft_tokens=codec.encode(torch.randn(4, 96), dtype), provenance=prov)
    signing.sign(packet, key)
    return packet


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


ALTERATIONS = {
    "a soft token byte": lambda p: setattr(p.soft_tokens, "data", _flip(p.soft_tokens.data)),
    "the shape": lambda p: p.soft_tokens.shape.__setitem__(slice(None), [8, 48]),
    "the dtype": lambda p: setattr(p.soft_tokens, "dtype", 2),
    "an int8 scale": lambda p: p.soft_tokens.scale.__setitem__(0, p.soft_tokens.scale[0] * 2),
    "the request id": lambda p: setattr(p.provenance, "request_id", "r2"),
    "the source model": lambda p: setattr(p.provenance, "source_model", "other"),
    "the source layer": lambda p: setattr(p.provenance, "source_layer", 3),
    "the target model": lambda p: setattr(p.provenance, "target_model", "other"),
    "the bridge id": lambda p: setattr(p.provenance, "bridge_id", "rogue"),
    "the bridge sha256": lambda p: setattr(p.provenance, "bridge_sha256", "b" * 64),
    "the signature": lambda p: setattr(p, "signature", _flip(p.signature)),
}


@pytest.mark.parametrize("what", list(ALTERATIONS))
def test_a_signed_packet_altered_anywhere_is_refused(what):
    from services import signing

    key = required(kind="target").packet_key
    packet = signed_packet(key, "int8")
    signing.verify(packet, key)  # as the bridge signed it
    ALTERATIONS[what](packet)
    with pytest.raises(PermissionDenied) as err:
        signing.verify(packet, key)
    assert err.value.field == "latent.signature" and "does not match" in str(err.value)


def test_unsigned_wrong_length_and_other_key_packets_are_refused_when_the_target_holds_a_key():
    from services import signing

    key = required(kind="target").packet_key
    with pytest.raises(PermissionDenied, match="latent.signature: missing"):
        signing.verify(signed_packet(None), key)
    packet = signed_packet(key)
    packet.signature += b"\0"
    with pytest.raises(InvalidArgument, match="latent.signature"):
        signing.verify(packet, key)
    other = required(internal=secrets.token_hex(16)).packet_key
    with pytest.raises(PermissionDenied, match="another key"):
        signing.verify(signed_packet(other), key)
    signing.verify(signed_packet(None), None)  # a target without a key accepts unsigned packets


def test_a_signed_packet_stays_valid_through_the_envelope():
    from latentwire.envelope import from_envelope, to_envelope
    from services import signing

    key = required(kind="bridge").packet_key
    for dtype in ("bfloat16", "int8"):
        packet = from_envelope(to_envelope(signed_packet(key, dtype)))
        assert len(packet.signature) == 32
        signing.verify(packet, key)


def test_the_packet_key_is_derived_from_the_internal_token_not_the_token_itself():
    a, b = required().packet_key, required(kind="bridge").packet_key
    assert a == b and len(a) == 32 and INTERNAL.encode() not in a
    assert required(internal=secrets.token_hex(16)).packet_key != a


# ---- over real gRPC --------------------------------------------------------------------------------
def client(address, token):
    from services.client import NO_RETRY, LatentWireClient

    return LatentWireClient(address, token=token, timeout_s=60, retry=NO_RETRY)


class AuthOverGrpc:
    """Auth over real gRPC. tests/test_multinode.py runs these (TestAuthOnTheClusterConfig) against
    deploy/cluster-gpu.yaml, where auth is on by default, so they need no cluster of their own;
    they use the fixtures `grpc_address`, `auth_token` and `internal_token` of the module that runs them."""

    @pytest.mark.parametrize("bad", [None, "", "wrong-token-0123456789abcdef"], ids=["none", "empty", "wrong"])
    def test_every_application_refuses_a_caller_without_the_token(self, grpc_address, auth_token, bad,
                                                                   monkeypatch):
        from tests.test_service_grpc import hidden_packet, latent_request

        monkeypatch.delenv(TOKEN_ENV, raising=False)  # the client would pick the token up from here
        with client(grpc_address, bad) as c:
            calls = {"source": lambda: c.ask(CONTEXT, QUESTION, "latent", max_new_tokens=3),
                     "stream": lambda: list(c.ask_stream(CONTEXT, QUESTION, "latent", max_new_tokens=3)),
                     "target": lambda: c.receive(latent_request()),
                     "bridge": lambda: c.translate(hidden_packet())}
            codes = {}
            for name, call in calls.items():
                try:
                    call()
                    codes[name] = "OK"
                except grpc.RpcError as err:
                    codes[name] = err.code().name
                    assert auth_token not in err.details()
            assert codes == dict.fromkeys(calls, "UNAUTHENTICATED")

    def test_the_clients_token_is_refused_by_every_method_of_the_bridge_and_target(self, grpc_address, auth_token,
                                                                                     internal_token):
        from tests.test_service_grpc import hidden_packet, latent_request

        with client(grpc_address, auth_token) as c:
            calls = {"Translate": lambda: c.translate(hidden_packet()),
                     "Receive": lambda: c.receive(latent_request()),
                     "ReceiveStream": lambda: list(c.agent.ReceiveStream(latent_request(), metadata=c.metadata("target"),
                                                                         timeout=60))}
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.value.details())
                details = err.value.details()
                assert "internal hop" in details and "authorization" in details and name in details
                assert auth_token not in details and internal_token not in details
            assert c.health("target") == c.health("bridge") == "SERVING"  # health stays open

    def test_a_forged_or_altered_packet_is_refused_even_with_the_internal_token(self, grpc_address, internal_token):
        from tests.test_service_grpc import hidden_packet, latent_request

        with client(grpc_address, internal_token) as hop:
            signed = hop.translate(hidden_packet()).latent  # what the bridge sends: signed
            assert len(signed.signature) == 32
            ok = hop.receive(pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION, max_new_tokens=3, latent=signed))
            assert ok.answer_tokens > 0
            forged = latent_request()  # well-formed, right provenance, made by no bridge
            altered = pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION, max_new_tokens=3, latent=signed)
            altered.latent.soft_tokens.data = bytes(len(signed.soft_tokens.data))  # zeros, same size
            relabelled = pb.ReceiveRequest(mode=pb.LATENT, question=QUESTION, max_new_tokens=3, latent=signed)
            relabelled.latent.provenance.request_id = "someone-else"
            for req, words in [(forged, "missing"), (altered, "does not match"), (relabelled, "does not match")]:
                with pytest.raises(grpc.RpcError) as err:
                    hop.receive(req)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
                assert "latent.signature" in err.value.details() and words in err.value.details()
            # and the internal token is no client credential: the source's Ask refuses it
            with pytest.raises(grpc.RpcError) as err:
                hop.ask(CONTEXT, QUESTION, "none", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    def test_ask_on_the_target_application_is_refused_naming_the_source(self, grpc_address, auth_token,
                                                                        internal_token):
        from services.client import NO_RETRY, LatentWireClient

        for token in (auth_token, internal_token):
            with LatentWireClient(grpc_address, source_app="target", token=token, timeout_s=60, retry=NO_RETRY) as c:
                for call in (lambda: c.ask(CONTEXT, QUESTION, "none", max_new_tokens=2),
                             lambda: list(c.ask_stream(CONTEXT, QUESTION, "none", max_new_tokens=2))):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value.details()
                    assert "source agent's application" in err.value.details()

    def test_the_token_works_end_to_end_in_every_mode(self, grpc_address, auth_token):
        with client(grpc_address, auth_token) as c:
            for mode in ("latent", "text", "direct", "none"):
                reply = c.ask(CONTEXT, QUESTION, mode, max_new_tokens=3)
                assert reply.answer_tokens > 0 and reply.target_model == "tiny-mistral"
            assert "".join(ch.text for ch in c.ask_stream(CONTEXT, QUESTION, "latent", max_new_tokens=3))
            assert c.health("source") == "SERVING"

    def test_refused_callers_change_nothing(self, grpc_address, auth_token):
        before = [a.actor_id for a in replicas()]
        with client(grpc_address, "wrong-token-0123456789abcdef") as bad:
            for _ in range(20):
                with pytest.raises(grpc.RpcError):
                    bad.ask(CONTEXT, QUESTION, "latent", request_id="same-id")
        with client(grpc_address, auth_token) as good:  # the refused request id was never cached or run
            assert good.ask(CONTEXT, QUESTION, "none", max_new_tokens=3, request_id="same-id").answer_tokens > 0
        assert [a.actor_id for a in replicas()] == before

    def test_cli_ask_takes_the_token_from_the_environment(self, grpc_address, auth_token):
        cmd = [sys.executable, "-m", "latentwire.cli", "ask", "--address", grpc_address, "--mode", "none",
               "--question", QUESTION, "--max-new-tokens", "2", "--json"]
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env({TOKEN_ENV: auth_token}))
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env({}))
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _env(extra: dict) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return {**env, **extra}


def test_a_target_checks_the_signature_then_the_pinned_bridge_weights(monkeypatch):
    """The target's own packet check (AgentServicer._soft_tokens): signature with the key from its
    environment, then `accepted_bridge_sha256`."""
    from services import signing
    from services.agent import AgentServicer

    monkeypatch.setenv(INTERNAL_TOKEN_ENV, INTERNAL)
    target = AgentServicer({"profile": "tiny-mistral", "role": "target", "accepted_bridge_sha256": ["a" * 64]})
    key = target.auth.packet_key
    assert key == required(kind="bridge").packet_key  # the bridge's key, from the same secret
    assert tuple(target._soft_tokens(signed_packet(key)).shape) == (4, 96)
    with pytest.raises(PermissionDenied, match="latent.signature"):
        target._soft_tokens(signed_packet(None))
    other = signed_packet(None)
    other.provenance.bridge_sha256 = "b" * 64
    signing.sign(other, key)  # signed, but by a bridge with other weights
    with pytest.raises(FailedPrecondition) as err:
        target._soft_tokens(other)
    assert err.value.field == "latent.provenance.bridge_sha256"
