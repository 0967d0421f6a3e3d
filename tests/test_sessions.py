"""Agent sessions: a conversation's turns share the target's KV cache (latentwire.sessions).

The model-side tests check the cache a session keeps against one prompt that spells the same
history, and the session table's limits. The service tests run the three Serve applications over
real gRPC with the tiny pair: turns of every mode grow one session's cache, refusals name
`session_id`, and a session the target lost is rebuilt from the source's log with the same answer.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from latentwire.errors import FailedPrecondition, NotFound, ResourceExhausted
from latentwire.sessions import SessionCaches, Sessions
from latentwire.settings import SessionLimits
from protos.latentwire.v1 import latentwire_pb2 as pb
from tests.conftest import free_port

CONTEXT = "Alice keeps the red key in Lisbon."
QUESTION = "Where is the key?"
FOLLOW_UP = "Who keeps it?"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---- model side ---------------------------------------------------------------------------------
def test_a_later_turn_is_answered_from_the_earlier_turns_in_the_cache(tiny_target):
    """Turn 2 from the session's cache equals one generation over [turn 1 prompt, its answer, turn 2 prompt]."""
    saved = tiny_target.eos_ids
    tiny_target.eos_ids = set()  # a fixed answer length: every answer token is in the history
    try:
        store = SessionCaches(SessionLimits())
        g1, _ = store.answer(tiny_target, "s", 0, CONTEXT, QUESTION, 5)
        g2, s = store.answer(tiny_target, "s", 1, None, FOLLOW_UP, 5)
        e1, e2 = tiny_target.target_inputs(CONTEXT, QUESTION)[0], tiny_target.target_inputs(None, FOLLOW_UP)[0]
        with torch.no_grad():
            history = torch.cat([e1, tiny_target.embed(torch.tensor(g1.token_ids)), e2])[None]
            ref = tiny_target.generate(history, 5)
    finally:
        tiny_target.eos_ids = saved
    assert g2.token_ids == ref.token_ids
    assert g1.cache_tokens == len(e1) + 5 and g2.cache_tokens == history.shape[1] + 5 == s.tokens
    assert s.turns == 2


def test_turns_must_follow_and_unknown_sessions_are_not_found(tiny_target):
    store = SessionCaches(SessionLimits())
    with pytest.raises(NotFound, match="session_id: unknown or expired session 'x'"):
        store.answer(tiny_target, "x", 1, None, QUESTION, 2)
    store.answer(tiny_target, "x", 0, None, QUESTION, 2)
    with pytest.raises(FailedPrecondition, match="session_id: session 'x' holds 1 turns; turn 2"):
        store.answer(tiny_target, "x", 2, None, QUESTION, 2)
    store.answer(tiny_target, "x", 1, None, QUESTION, 2)
    _, s = store.answer(tiny_target, "x", 0, None, QUESTION, 2)  # turn 0 restarts the session
    assert s.turns == 1


def test_a_turn_past_the_token_limit_is_refused_and_leaves_the_session_as_it_was(tiny_target):
    store = SessionCaches(SessionLimits(max_tokens=120))
    g, s = store.answer(tiny_target, "t", 0, None, QUESTION, 4)
    with pytest.raises(ResourceExhausted, match=r"session_id: session 't' holds \d+ tokens.*sessions.max_tokens"):
        store.answer(tiny_target, "t", 1, CONTEXT * 3, QUESTION, 4)
    assert (s.turns, s.tokens) == (1, g.cache_tokens) and s.state.get_seq_length() == g.cache_tokens


def test_least_recently_used_and_idle_sessions_are_evicted():
    clock = Clock()
    table = Sessions(SessionLimits(max_sessions=2, idle_s=10), clock=clock)
    table.open("a", 0).turns = 1
    table.open("b", 0).turns = 1
    clock.t = 1
    table.open("a", 1)  # a is used: b is now the least recently used
    table.open("c", 0)
    assert "a" in table and "b" not in table and "c" in table
    clock.t = 11.5  # a was last used at 1, c at 1
    assert len(table) == 0
    with pytest.raises(NotFound):
        table.open("a", 1)


# ---- over gRPC ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local
    from tests.serve_cluster import RAY_INIT, tiny_config

    cfg = tiny_config(tiny_bridge_path, free_port(), free_port())
    apps = {a["name"]: a for a in cfg["applications"]}
    # the target holds 2 sessions, the source logs 8: a session the target evicted is rebuilt
    apps["target"]["args"]["sessions"] = {"max_sessions": 2, "max_tokens": 600}
    apps["source"]["args"]["sessions"] = {"max_sessions": 8, "max_tokens": 600}
    local.deploy(cfg, address="local", ray_init=RAY_INIT)
    yield local.grpc_address(cfg)
    local.shutdown()


def turn(client, session, n, mode="latent", context=CONTEXT, question=QUESTION, max_new_tokens=4):
    req = client.request(context, question, mode, max_new_tokens=max_new_tokens)
    req.session_id, req.session_turn = session, n
    return client.ask(request=req)


def test_a_session_grows_its_cache_turn_by_turn_in_every_mode(client, tiny_target):
    replies = [turn(client, "every-mode", n, mode, question=f"{QUESTION} ({mode})")
               for n, mode in enumerate(["latent", "text", "extract", "direct", "none"])]
    assert [r.session_turns for r in replies] == [1, 2, 3, 4, 5]
    assert all(r.session_id == "every-mode" and r.replayed_turns == 0 and r.answer_tokens > 0 for r in replies)
    kv = [r.kv_cache_tokens for r in replies]
    assert all(b > a for a, b in zip(kv, kv[1:])), kv
    # the last turn (NONE) adds its prompt, its answer and at most the answer's end to the cache
    prompt = tiny_target.target_inputs(None, f"{QUESTION} (none)").shape[1]
    assert prompt + replies[-1].answer_tokens <= kv[-1] - kv[-2] <= prompt + replies[-1].answer_tokens + 1
    single = client.ask(CONTEXT, QUESTION, "none", max_new_tokens=4)  # no session: a fresh cache
    assert single.kv_cache_tokens < kv[0] + prompt and not single.session_id and single.session_turns == 0


def test_unknown_sessions_and_turns_out_of_order_get_a_status_naming_session_id(client, cluster):
    from services.client import NO_RETRY, LatentWireClient

    with pytest.raises(grpc.RpcError) as err:
        turn(client, "never-started", 3)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "session_id" in err.value.details()
    # the target itself: a follow-up turn of a session it does not hold
    with LatentWireClient(cluster, timeout_s=30, retry=NO_RETRY) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.receive(pb.ReceiveRequest(mode=pb.NONE, question=QUESTION, session_id="nowhere", session_turn=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "session_id: unknown or expired session" in \
        err.value.details()
    turn(client, "ordered", 0, "none")
    with pytest.raises(grpc.RpcError) as err:
        turn(client, "ordered", 2, "none")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "session_id" in err.value.details()
    assert turn(client, "ordered", 1, "none").session_turns == 2  # the session is intact


def test_a_turn_past_the_session_token_limit_is_resource_exhausted(client):
    turn(client, "long", 0, "none")
    with pytest.raises(grpc.RpcError) as err:
        turn(client, "long", 1, "direct", context=" ".join([CONTEXT] * 40))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "session_id: session 'long'" in err.value.details() and "sessions.max_tokens" in err.value.details()
    assert turn(client, "long", 1, "none").session_turns == 2  # refused, not lost


def test_a_session_the_target_evicted_is_rebuilt_from_the_source_log_with_the_same_answer(client):
    first = turn(client, "rebuilt", 0, "latent")
    for other in ("filler-1", "filler-2"):  # the target holds 2 sessions: "rebuilt" is evicted there
        turn(client, other, 0, "none")
    again = turn(client, "rebuilt", 1, "none", question=FOLLOW_UP)
    assert again.replayed_turns == 1 and again.session_turns == 2
    ref0 = turn(client, "uninterrupted", 0, "latent")
    ref1 = turn(client, "uninterrupted", 1, "none", question=FOLLOW_UP)
    assert ref1.replayed_turns == 0 and (ref0.answer, ref0.kv_cache_tokens) == (first.answer, first.kv_cache_tokens)
    assert (again.answer, again.kv_cache_tokens) == (ref1.answer, ref1.kv_cache_tokens)


def test_a_streamed_session_turn_continues_the_session(client):
    turn(client, "streamed", 0, "text")
    req = client.request(CONTEXT, FOLLOW_UP, "latent", max_new_tokens=4)
    req.session_id, req.session_turn = "streamed", 1
    chunks = list(client.ask_stream(request=req))
    reply = chunks[-1].reply
    assert reply.session_turns == 2 and "".join(c.text for c in chunks[:-1]).strip() == reply.answer
