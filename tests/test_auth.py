"""Bearer-token authentication at the gRPC ingress, checked inside the deployments.

Unit tests of services.auth here; the tests over real gRPC (class AuthOverGrpc: no token or a wrong
one is UNAUTHENTICATED on every application, the right one works end to end, the source forwarding it
on its hops) run in tests/test_multinode.py on the cluster config, where auth is on by default and the
token reaches the replicas only through their environment (one cluster fewer for the suite).
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import grpc
import pytest

from latentwire.settings import AuthSettings
from services.auth import BearerAuth, Unauthenticated
from tests.serve_cluster import TOKEN_ENV, replicas

TOKEN = secrets.token_hex(16)
CONTEXT = "Alice keeps the red key in Lisbon."
QUESTION = "Where is the key?"


# ---- unit ------------------------------------------------------------------------------------------
def required(token=TOKEN) -> BearerAuth:
    return BearerAuth(AuthSettings(required=True), environ={TOKEN_ENV: token})


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer wrong-token-0123456789")], [("authorization", f"Basic {TOKEN}")],
    [("authorization", "Bearer ")], [("authorization", TOKEN)], [("x-token", TOKEN)],
    [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")],
    [("authorization", f"Bearer {TOKEN}x")], [("authorization", f"Bearer {TOKEN[:-1]}")],
])
def test_anything_but_the_exact_bearer_token_is_unauthenticated(metadata):
    with pytest.raises(Unauthenticated) as err:
        required().check(metadata)
    assert err.value.code == "UNAUTHENTICATED" and TOKEN not in str(err.value)  # never echo the secret


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer   {TOKEN} "])
def test_the_bearer_token_is_accepted(value):
    required().check([("application", "source"), ("Authorization", value)])


def test_auth_off_accepts_anything_and_sends_no_token_it_does_not_have():
    auth = BearerAuth(AuthSettings(), environ={})
    auth.check([])
    assert auth.metadata() == ()


def test_a_service_requiring_auth_refuses_to_start_without_a_strong_token():
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        BearerAuth(AuthSettings(required=True), environ={})
    with pytest.raises(RuntimeError, match="at least 16"):
        required("short")


def test_the_token_is_compared_in_constant_time(monkeypatch):
    import hmac

    calls = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    required().check([("authorization", f"Bearer {TOKEN}")])
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


# ---- over real gRPC --------------------------------------------------------------------------------
def client(address, token):
    from services.client import NO_RETRY, LatentWireClient

    return LatentWireClient(address, token=token, timeout_s=60, retry=NO_RETRY)


class AuthOverGrpc:
    """Auth over real gRPC. tests/test_multinode.py runs these (TestAuthOnTheClusterConfig) against
    deploy/cluster-gpu.yaml, where auth is on by default, so they need no cluster of their own;
    they use the fixtures `grpc_address` and `auth_token` of the module that runs them."""

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
