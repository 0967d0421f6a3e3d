"""Bearer-token authentication at the gRPC ingress, checked inside the deployments.

Unit tests of services.auth, then a real local cluster with auth on (the token reaches the
replicas only through their environment): no token or a wrong one is UNAUTHENTICATED on every
application, the right one works end to end (the source forwards it on its hops).
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import grpc
import pytest

from latentwire.settings import AuthSettings
from services.auth import BearerAuth, Unauthenticated
from tests.conftest import free_port
from tests.serve_cluster import TOKEN_ENV, replicas, start_ray, tiny_config

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
@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    start_ray()
    cfg = tiny_config(tiny_bridge_path, free_port(), free_port(), token=TOKEN)
    local.deploy(cfg)
    yield local.grpc_address(cfg)
    local.shutdown()


def client(address, token):
    from services.client import NO_RETRY, LatentWireClient

    return LatentWireClient(address, token=token, timeout_s=60, retry=NO_RETRY)


@pytest.mark.parametrize("token", [None, "", "wrong-token-0123456789abcdef"], ids=["none", "empty", "wrong"])
def test_every_application_refuses_a_caller_without_the_token(cluster, token, monkeypatch):
    from tests.test_service_grpc import hidden_packet, latent_request

    monkeypatch.delenv(TOKEN_ENV, raising=False)  # the client would pick the token up from here
    with client(cluster, token) as c:
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
                assert TOKEN not in err.details()
        assert codes == dict.fromkeys(calls, "UNAUTHENTICATED")


def test_the_token_works_end_to_end_in_every_mode(cluster):
    with client(cluster, TOKEN) as c:
        for mode in ("latent", "text", "direct", "none"):
            reply = c.ask(CONTEXT, QUESTION, mode, max_new_tokens=3)
            assert reply.answer_tokens > 0 and reply.target_model == "tiny-mistral"
        assert "".join(ch.text for ch in c.ask_stream(CONTEXT, QUESTION, "latent", max_new_tokens=3))
        assert c.health("source") == "SERVING"


def test_refused_callers_change_nothing(cluster):
    before = [a.actor_id for a in replicas()]
    with client(cluster, "wrong-token-0123456789abcdef") as bad:
        for _ in range(20):
            with pytest.raises(grpc.RpcError):
                bad.ask(CONTEXT, QUESTION, "latent", request_id="same-id")
    with client(cluster, TOKEN) as good:  # the refused request id was never cached or run
        assert good.ask(CONTEXT, QUESTION, "none", max_new_tokens=3, request_id="same-id").answer_tokens > 0
    assert [a.actor_id for a in replicas()] == before


def test_cli_ask_takes_the_token_from_the_environment(cluster):
    cmd = [sys.executable, "-m", "latentwire.cli", "ask", "--address", cluster, "--mode", "none",
           "--question", QUESTION, "--max-new-tokens", "2", "--json"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env({TOKEN_ENV: TOKEN}))
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env({}))
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _env(extra: dict) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return {**env, **extra}
