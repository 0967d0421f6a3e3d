"""Sessions on a served cluster with a dense and a compressed target (mean pooling, no sidecar needed).

Real Ray, real gRPC through the Serve proxy, the tiny pair: a compressed session passes its budget
and keeps a smaller cache than the dense session while answering every turn; a target replica killed
mid-conversation loses no session and changes no answer (the source replays its turn log to the new
replica); `latentwire bench --session-turns` reports both targets side by side.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import free_port
from tests.serve_cluster import replicas, start_ray, tiny_config

WINDOW, SINK, RECENT = 4, 2, 8  # the compressed target's kv_compression
TARGETS = {"default": "target", "pooled": "target-pooled"}  # target agent -> its Serve application
PEOPLE = [("Alice", "red", "Lisbon"), ("Bruno", "green", "Oslo"), ("Chen", "blue", "Quito")]
# one session's turns; at turn 2 the target is killed and the other sessions' turns then go at once:
# DIRECT has no batched stage before the target, whose session turns run alone, so its answers do not
# depend on which requests share a forward
MODES = ["latent", "text", "direct", "none", "extract", "latent"]
KILL_AFTER = 2
MID_TURN_TOKENS = 32  # turn KILL_AFTER's answers: long enough that the kill lands while one streams


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    cfg = tiny_config(tiny_bridge_path, free_port(), free_port())
    apps = {a["name"]: a for a in cfg["applications"]}
    pooled = {"name": "target-pooled", "route_prefix": "/target-pooled", "import_path": "services.app:agent_app",
              "args": dict(apps["target"]["args"], kv_compression={"method": "mean_pool", "window": WINDOW,
                                                                     "sink": SINK, "recent": RECENT}),
              "runtime_env": apps["target"].get("runtime_env", {}),
              "deployments": [dict(apps["target"]["deployments"][0], num_replicas=1)]}
    cfg["applications"].append(pooled)
    apps["source"]["args"]["targets"]["pooled"] = {"app": "target-pooled", "bridge_app": "bridge"}
    start_ray()  # with the dashboard: Ray's state API finds the replica actors to kill
    local.deploy(cfg)
    yield local.grpc_address(cfg)
    local.shutdown()


def ask_turn(client, session: str, turn: int, mode: str, context: str, question: str, target: str = "",
             max_new_tokens: int = 4):
    req = client.request(context, question, mode, max_new_tokens=max_new_tokens, target_agent=target)
    req.session_id, req.session_turn = session, turn
    return client.ask(request=req)


def person_turn(k: int, t: int) -> tuple[str, str, str]:
    """Session k's turn t: its mode, a context and a question."""
    name, color, city = PEOPLE[k]
    return (MODES[t], f"{name} keeps the {color} key number {t} in {city}.",
            f"Where is key {t}?" if t % 2 else f"Who keeps the {color} key?")


def test_a_compressed_session_passes_its_budget_with_a_smaller_cache_and_answers_every_turn(client, tiny_target):
    """One session of 6 DIRECT turns on each target. The compressed one holds, after each turn, at
    most sink + (T - sink - recent) // window + recent + window entries for the T tokens it read
    (docs/sessions.md), fewer than the dense session once past that budget. The tiny target's layers
    all slide over 256 tokens: past that, a dense layer holds 255 entries (its `kv_cache_tokens` counts
    the tokens read), and the compressed one first drops what the dense layer no longer sees."""
    turns = [(f"Parcel {t} is blue and goes to Oslo.", f"What colour is parcel {t}?") for t in range(6)]
    dense = [ask_turn(client, "budget-dense", t, "direct", c, q) for t, (c, q) in enumerate(turns)]
    pooled = [ask_turn(client, "budget-pooled", t, "direct", c, q, "pooled") for t, (c, q) in enumerate(turns)]
    seen = 0  # an upper bound of the tokens the compressed session read: each prompt, answer and its end
    for t, ((c, q), d, p) in enumerate(zip(turns, dense, pooled)):
        assert (d.session_turns, p.session_turns) == (t + 1, t + 1) and p.target_agent == "pooled"
        assert d.answer_tokens > 0 and p.answer_tokens > 0 and p.replayed_turns == 0
        seen += tiny_target.target_inputs(tiny_target.tokenize(c), q).shape[1] + p.answer_tokens + 1
        budget = SINK + max(seen - SINK - RECENT, 0) // WINDOW + RECENT + WINDOW
        assert p.kv_cache_tokens <= budget, (t, p.kv_cache_tokens, budget)
        if d.kv_cache_tokens > SINK + RECENT + WINDOW:
            assert p.kv_cache_tokens < d.kv_cache_tokens, (t, p.kv_cache_tokens, d.kv_cache_tokens)
    print(f"\ncompressed session: kv {[p.kv_cache_tokens for p in pooled]}, dense {[d.kv_cache_tokens for d in dense]}")
    assert dense[-1].kv_cache_tokens > 4 * (SINK + RECENT + WINDOW)  # far past the budget
    assert pooled[-1].kv_cache_tokens < 0.5 * min(dense[-1].kv_cache_tokens, 255)


def stream_turn(client, session: str, turn: int, mode: str, context: str, question: str, target: str,
                max_new_tokens: int, on_text):
    """A session turn through AskStream; `on_text()` is called at its first piece of text. Returns the reply."""
    req = client.request(context, question, mode, max_new_tokens=max_new_tokens, target_agent=target)
    req.session_id, req.session_turn = session, turn
    reply, text = None, ""
    for chunk in client.ask_stream(request=req):
        if chunk.HasField("reply"):
            reply = chunk.reply
        else:
            if not text:
                on_text()
            text += chunk.text
    assert reply is not None and text.strip() == reply.answer, (text, reply)
    return reply


def run_sessions(client, ids: list[str], target: str, kill: str | None = None) -> list[list]:
    """Every session's turns, turn by turn (turn KILL_AFTER answers MID_TURN_TOKENS long). With `kill`
    (an application), its one replica is killed (`ray.kill`) while session 0's turn KILL_AFTER streams
    its answer, and the other sessions' turn KILL_AFTER are then sent all at once."""
    import ray

    replies = [[] for _ in ids]
    for t in range(len(MODES)):
        n = MID_TURN_TOKENS if t == KILL_AFTER else 4
        if kill and t == KILL_AFTER:
            (actor,) = replicas(kill)
            handle, killed = ray.get_actor(actor.name, namespace=actor.ray_namespace), []

            def kill_once():
                if not killed:
                    ray.kill(handle, no_restart=True)
                    killed.append(True)

            got = [stream_turn(client, ids[0], t, *person_turn(0, t), target, n, kill_once)]
            kill_once()  # should the answer have had no text
            with ThreadPoolExecutor(len(ids)) as pool:
                got += pool.map(lambda k: ask_turn(client, ids[k], t, *person_turn(k, t), target, n),
                                range(1, len(ids)))
        else:
            got = [ask_turn(client, sid, t, *person_turn(k, t), target, n) for k, sid in enumerate(ids)]
        for k, reply in enumerate(got):
            replies[k].append(reply)
    return replies


@pytest.mark.parametrize("target", ["default", "pooled"])
def test_a_target_replica_killed_mid_conversation_loses_no_session_and_changes_no_answer(cluster, target):
    """3 sessions of 6 turns (LATENT, TEXT, DIRECT, NONE, EXTRACT, LATENT), uninterrupted; then the
    same sessions under new ids, the target's replica killed (`ray.kill`) at turn 2, while the first
    session's turn streams its answer. Every turn is answered (the client retries, the stream
    included, while Serve replaces the replica); each session is rebuilt once, at the first turn the
    new replica gets, by replaying the turns the source logged before it; every answer and cache size
    equals the uninterrupted run's."""
    from services.client import LatentWireClient, RetryPolicy

    app, agent = TARGETS[target], "" if target == "default" else target
    (before,) = replicas(app)
    with LatentWireClient(cluster, timeout_s=120, retry=RetryPolicy(attempts=30, max_backoff_s=2.0)) as client:
        ref = run_sessions(client, [f"ref-{target}-{k}" for k in range(len(PEOPLE))], agent)
        got = run_sessions(client, [f"killed-{target}-{k}" for k in range(len(PEOPLE))], agent, kill=app)
        retries, resumed = client.retries, client.stream_resumes
        if target == "pooled":  # the first session's turns on the dense target, for the cache sizes
            dense = run_sessions(client, [f"dense-{target}-0"], "")[0]
    (after,) = replicas(app)
    assert after.actor_id != before.actor_id  # the replica was killed and replaced
    print(f"\nsession kill test ({target}): client retries {retries}, streams resumed mid-way {resumed}, "
          f"replayed {[[x.replayed_turns for x in g] for g in got]}, kv at the last turn "
          f"{[g[-1].kv_cache_tokens for g in got]}")
    for k, (r, g) in enumerate(zip(ref, got)):
        assert [x.session_turns for x in g] == list(range(1, len(MODES) + 1))
        assert [x.replayed_turns for x in r] == [0] * len(MODES)
        # the first session's turn 2 is rebuilt if the kill landed before its answer was done, else turn 3
        first = KILL_AFTER if k or g[KILL_AFTER].replayed_turns else KILL_AFTER + 1
        assert [x.replayed_turns for x in g] == [first if t == first else 0 for t in range(len(MODES))]
        assert [x.answer for x in g] == [x.answer for x in r], k
        assert [x.kv_cache_tokens for x in g] == [x.kv_cache_tokens for x in r], k
        assert all(x.answer_tokens > 0 and x.target_agent == target for x in g)
    if target == "pooled":  # the compressed sessions passed their budget: a smaller cache than dense
        assert dense[-1].kv_cache_tokens > 4 * (SINK + RECENT + WINDOW)
        assert ref[0][-1].kv_cache_tokens < 0.5 * min(dense[-1].kv_cache_tokens, 255)  # a dense layer's entries


def test_bench_runs_sessions_against_both_targets_side_by_side(cluster, tmp_path, capsys):
    """`latentwire bench --requests 0 --session-turns 3 --concurrency 2 --targets default,pooled`:
    2 sessions of 3 turns against each target at once; the JSON holds, per target, the turns
    answered, per-turn p50/p95, the KV cache by turn and at the last turn, and the compressed target
    against the dense one."""
    from latentwire.cli import main

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["bench", "--address", cluster, "--requests", "0", "--session-turns", "3", "--concurrency", "2",
               "--context-tokens", "32", "--targets", "default,pooled", "--session-mode", "direct",
               "--max-new-tokens", "3", "--message-tokens", "8", "--warmup", "1", "--json", str(out),
               "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    report = json.loads(out.read_text())
    assert report["settings"] == [] and report["config"]["session_turns"] == 3
    (run,) = report["sessions"]
    assert (run["concurrency"], run["turns"], run["mode"], run["context_tokens"]) == (2, 3, "direct", 32)
    s = run["summary"]
    assert s["vs"] == "default" and set(s["targets"]) == {"default", "pooled"}
    for name, m in s["targets"].items():
        assert (m["turns_ok"], m["turns_planned"], m["sessions_completed"], m["errors"]) == (6, 6, 2, {}), name
        assert 0 < m["turn_p50_ms"] <= m["turn_p95_ms"] and len(m["turn_p50_ms_by_turn"]) == 3
        kv = m["kv_cache_tokens_by_turn"]
        # the dense cache grows every turn; tiny Mistral's layers are all sliding-window layers, so the
        # pooled one stops growing at its window's budget (they keep their newest entries)
        assert len(kv) == 3 and kv[0] < kv[1] and (kv[1] < kv[2] if name == "default" else kv[1] <= kv[2])
        assert kv[2] == m["kv_cache_tokens_last_turn"]
        assert m["replayed_turns"] == 0 and 0 <= m["exact_match"] <= 1
        recs = [r for r in run["records"] if r["target"] == name]
        assert sorted((r["session"], r["turn"]) for r in recs) == [(k, t) for k in range(2) for t in range(3)]
        assert all(r["ok"] and r["session_turns"] == r["turn"] + 1 for r in recs)
    dense, pooled = s["targets"]["default"], s["targets"]["pooled"]
    assert pooled["kv_cache_tokens_last_turn"] < dense["kv_cache_tokens_last_turn"]
    assert pooled["kv_cache_smaller"] == dense["kv_cache_tokens_last_turn"] / pooled["kv_cache_tokens_last_turn"] > 1
    assert dense["kv_cache_smaller"] == dense["turn_p50_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "KV smaller" in printed and "x vs default" in printed
    assert json.loads(printed.strip().splitlines()[-1])["sessions"][0]["summary"]["vs"] == "default"
