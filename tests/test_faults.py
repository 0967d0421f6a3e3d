"""Faults: each replica (source, bridge, target) is killed (by its actor) while a load of requests runs,
and a training worker is killed mid-job.

Serve must replace the replica; the client retries idempotent requests (same request id), streams
included, with backoff inside each request's deadline; every request is answered and none outlives
its deadline. The training job must resume from its last checkpoint, not from step 0.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.packets import parse_mode
from tests.conftest import free_port
from tests.serve_cluster import replicas, start_ray, tiny_config, wait_for

REQUESTS, CONCURRENCY, DEADLINE_S = 200, 8, 30.0
# completed requests -> the app whose replica is killed then; the source and the target are killed
# while a stream is mid-way (it has sent text and not yet its reply)
KILLS = {30: "target", 90: "bridge", 150: "source"}
MID_STREAM = {"target", "source"}
STREAM_TOKENS = 16  # long enough that some stream is mid-way when a kill lands
CONTEXT = "Alice keeps the red key in Lisbon."
QUESTION = "Where is the key?"


def test_killing_a_training_worker_resumes_from_the_last_checkpoint_with_the_same_metrics(tmp_path):
    """Runs first, on its own Ray (the Serve cluster of this module starts after it)."""
    import glob
    import os
    import signal

    import ray
    from ray.util.state import list_actors

    from bridge.perceiver import PerceiverBridge
    from bridge.train import TrainConfig, run
    from latentwire.jobs import REPO_ROOT
    from tests.serve_cluster import state_address

    cfg = TrainConfig(source="tiny-llama", target="tiny-mistral", num_queries=4, d_model=32, n_layers=1, steps=12,
                      batch_size=2, train_items=24, val_items=3, eval_every=12, checkpoint_every=4, anchor_steps=0,
                      threads=1, num_workers=2, max_failures=2, max_new_tokens=3, cache_dir=str(tmp_path / "cache"),
                      storage_path=str(tmp_path / "ray"))
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start_ray(runtime_env={"env_vars": env})
    try:
        from dataclasses import replace

        baseline = run(replace(cfg, name="uninterrupted"), progress=False)
        killed: dict = {}

        def registered_step() -> int:
            """The step of the latest checkpoint Ray Train has registered (its controller's snapshot;
            a checkpoint on storage that the controller has not yet collected is not resumed from)."""
            try:
                snap = json.loads((tmp_path / "ray" / "killed" / "checkpoint_manager_snapshot.json").read_text())
                return int((snap.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0))
            except (OSError, ValueError):  # not written yet, or being written
                return 0

        def kill_after_first_checkpoint():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not killed:
                step = registered_step()
                workers = list_actors(address=state_address(), filters=[("class_name", "=", "RayTrainWorker"),
                                                                        ("state", "=", "ALIVE")])
                if 0 < step < cfg.steps and len(workers) == 2:
                    os.kill(workers[-1].pid, signal.SIGKILL)  # a crash: no cleanup, no Python exception
                    killed.update(pid=workers[-1].pid, after_step=step)
                time.sleep(0.05)

        killer = threading.Thread(target=kill_after_first_checkpoint)
        killer.start()
        resumed = run(replace(cfg, name="killed"), progress=False)
        killer.join()
    finally:
        ray.shutdown()
    assert killed and killed["after_step"] < cfg.steps, killed  # killed mid-job, after a checkpoint
    assert resumed["steps"] == baseline["steps"] == cfg.steps  # the job finished
    # the uninterrupted job ran once, from step 0; the killed one twice: from step 0, then from a
    # checkpoint (a multiple of checkpoint_every, after step 0, no later than the kill could have seen)
    assert baseline["started_at_steps"] == [0] and baseline["resumed_from"] == 0, baseline["started_at_steps"]
    first, restart = resumed["started_at_steps"][0], resumed["started_at_steps"][-1]
    assert len(resumed["started_at_steps"]) == 2 and first == 0, resumed["started_at_steps"]
    assert killed["after_step"] <= restart < cfg.steps and restart % cfg.checkpoint_every == 0, (
        resumed["started_at_steps"], killed)
    assert resumed["resumed_from"] == restart  # the final metrics came from the resumed attempt
    assert [int(m["step"]) for m in resumed["history"]] == [int(m["step"]) for m in baseline["history"]]
    for path in glob.glob(str(tmp_path / "ray" / "killed" / "**" / "bridge.safetensors"), recursive=True):
        PerceiverBridge.load(path)  # every checkpoint left on storage is whole (sha256 matches its manifest)
    a, b = baseline["final_metrics"], resumed["final_metrics"]
    record = {k: (round(a[k], 5), round(b[k], 5)) for k in ("train_nll", "val_nll", "val_rms_ratio") if k in a}
    print("\nworker-kill test:", json.dumps({"killed_after_step": killed["after_step"], "steps": cfg.steps,
                                             "started_at_steps": resumed["started_at_steps"],
                                             "uninterrupted_vs_killed": record,
                                             "seconds": (baseline["total_seconds"], resumed["total_seconds"])}))
    for k, (x, y) in record.items():  # same data order, restored optimizer: equal up to float noise
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (k, x, y)


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    cfg = tiny_config(tiny_bridge_path, free_port(), free_port())
    # the source's own hop deadline stays below the client's, so a stuck hop surfaces as a status
    next(a for a in cfg["applications"] if a["name"] == "source")["args"]["hop_timeout_s"] = 20
    start_ray()
    local.deploy(cfg)
    yield local.grpc_address(cfg)
    local.shutdown()


def test_retry_policy_backs_off_exponentially_within_the_deadline():
    from services.client import RetryPolicy, call_with_retries

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "no replica"

    pauses, policy = [], RetryPolicy(attempts=10, initial_backoff_s=0.1, max_backoff_s=0.4)

    def fail(left):
        raise Unavailable()

    with pytest.raises(Unavailable):
        call_with_retries(fail, timeout=60, policy=policy, sleep=pauses.append)
    assert len(pauses) == 9 and all(0 <= p <= min(0.4, 0.1 * 2**i) for i, p in enumerate(pauses))
    # the deadline bounds the retries: a 0.3 s budget stops before sleeping past it
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        call_with_retries(fail, timeout=0.3, policy=RetryPolicy(attempts=100, initial_backoff_s=0.05))
    assert time.monotonic() - t0 < 0.35


def test_non_retryable_statuses_fail_at_once():
    from services.client import RetryPolicy, call_with_retries

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "context: 400 tokens exceed the configured limit of 256"

    calls = []

    def refuse(left):
        calls.append(left)
        raise Refused()

    with pytest.raises(Refused):
        call_with_retries(refuse, timeout=10, policy=RetryPolicy())
    assert len(calls) == 1  # our input limits are final; only Serve's backpressure is retried


def _kind(i: int) -> tuple[str, bool]:
    """Request i's mode and whether it streams: 8 in 10 LATENT (the bridge in the path), one TEXT, one
    NONE; every other request streams (AskStream), the rest are unary (Ask)."""
    return ("text" if i % 10 == 3 else "none" if i % 10 == 7 else "latent"), i % 2 == 0


def running(app: str) -> bool:
    """Serve reports the app's one replica RUNNING (its constructor done, health checks passing)."""
    from ray import serve

    status = serve.status().applications.get(app)
    return bool(status) and all(d.replica_states.get("RUNNING", 0) == 1 and len(d.replica_states) == 1
                                for d in status.deployments.values())


def test_killing_each_replica_under_load_loses_no_request(cluster):
    """The source, the bridge and the target replica are each killed once (SIGKILL-like `ray.kill`)
    while 200 requests run 8 at a time, half of them streams; the source and target kills land
    while a stream is mid-way. Every request must be answered: 200 of 200 OK, none past its deadline
    (a DEADLINE_EXCEEDED is a failure), with client retries under the same request id."""
    import ray

    from services.client import LatentWireClient

    apps = list(KILLS.values())
    before = {app: replicas(app) for app in apps}
    assert all(len(v) == 1 for v in before.values()), before
    outcomes: collections.Counter = collections.Counter()
    over_deadline, lock = [], threading.Lock()
    reached = {n: threading.Event() for n in KILLS}
    mid_stream: dict[int, int] = {}  # request -> text chunks received, for streams in flight
    killed: dict = {}
    details: dict = {}  # one message per non-OK status, for the record
    kinds: collections.Counter = collections.Counter()
    failed: list = []  # (request, started at s, lasted s) of each failure, for the record

    def one(i: int, client: LatentWireClient):
        mode, streaming = _kind(i)
        rid, t0 = f"load-{i}", time.monotonic()
        try:
            if streaming:
                text, reply = [], None
                for chunk in client.ask_stream(CONTEXT, QUESTION, mode, max_new_tokens=STREAM_TOKENS,
                                               request_id=rid, timeout=DEADLINE_S):
                    if chunk.HasField("reply"):
                        reply = chunk.reply
                    else:
                        text.append(chunk.text)
                        with lock:
                            mid_stream[i] = mid_stream.get(i, 0) + 1
                assert reply is not None and "".join(text).strip() == reply.answer, (text, reply)
            else:
                reply = client.ask(CONTEXT, QUESTION, mode, max_new_tokens=4, request_id=rid, timeout=DEADLINE_S)
            assert reply.answer_tokens > 0 and reply.request_id == rid and reply.mode == parse_mode(mode)
            status = "OK"
        except grpc.RpcError as err:
            status = err.code().name
            details.setdefault(status, err.details())
            failed.append((i, round(t0 - t_start, 1), round(time.monotonic() - t0, 1)))
        elapsed = time.monotonic() - t0
        with lock:
            mid_stream.pop(i, None)
            outcomes[status] += 1
            kinds[f"{mode}:{'stream' if streaming else 'unary'}:{status}"] += 1
            if elapsed > DEADLINE_S + 2.0:
                over_deadline.append((i, elapsed))
            if sum(outcomes.values()) in reached:
                reached[sum(outcomes.values())].set()

    def killer():
        for n, app in KILLS.items():
            reached[n].wait(180)
            if app in MID_STREAM:  # wait (briefly) for a stream that has sent text and not finished
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not mid_stream:
                    time.sleep(0.002)
            actor = replicas(app)[0]
            with lock:
                killed[app] = dict(actor_id=actor.actor_id, after=sum(outcomes.values()),
                                   streams_mid_way=len(mid_stream))
            t_kill = time.monotonic()
            ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace), no_restart=True)
            # for the record: how long the app had no replica serving
            wait_for(lambda: [a for a in replicas(app) if a.actor_id != actor.actor_id] and running(app), 120,
                     f"a running replacement {app} replica", poll_s=0.2)
            killed[app].update(at_s=round(t_kill - t_start, 1), replaced_s=round(time.monotonic() - t_kill, 1))

    t_start = time.monotonic()
    with LatentWireClient(cluster, timeout_s=DEADLINE_S) as client:
        client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=2)  # warm-up
        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda i: one(i, client), range(REQUESTS)))
        kill_thread.join()
        wall = time.monotonic() - t_start
        # Serve replaced every killed replica: new actors, and requests succeed through them
        after = {app: wait_for(lambda app=app: [a for a in replicas(app) if a.actor_id != killed[app]["actor_id"]],
                               60, f"a replacement {app} replica") for app in apps}
        assert client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=3).answer_tokens > 0
    record = dict(requests=REQUESTS, concurrency=CONCURRENCY, killed=killed, outcomes=dict(outcomes),
                  by_kind=dict(sorted(kinds.items())), retries=client.retries,
                  streams_resumed_mid_way=client.stream_resumes, over_deadline=len(over_deadline),
                  wall_s=round(wall, 1), details=details, failed=failed)
    print("\nkill test:", json.dumps(record))
    assert set(killed) == set(apps)  # each replica was killed once, during the load
    assert all(0 < k["after"] < REQUESTS for k in killed.values()), killed
    assert not over_deadline, over_deadline  # none hung past its deadline
    assert outcomes == {"OK": REQUESTS}, (outcomes, details)  # 200 of 200: retries absorbed every outage
    assert client.stream_resumes >= 1, record  # a stream broken mid-way was retried to its end
    for app in apps:
        assert len(after[app]) == 1 and after[app][0].actor_id != before[app][0].actor_id


def test_concurrent_hidden_states_do_not_cross_talk(tiny_source):
    """The source runs hidden_states in worker threads; each call must get its own request's states."""
    ids = [tiny_source.source_ids(f"Item {i} is kept in room {i * 7}.", "Where?") for i in range(16)]
    want = [tiny_source.hidden_states(x, 2) for x in ids]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: tiny_source.hidden_states(x, 2), ids))
            assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("details, code", [
    ("The actor is dead because it was killed by `ray.kill`.", "UNAVAILABLE"),
    ("The actor died unexpectedly before finishing this task.", "UNAVAILABLE"),
    ("ray.exceptions.ActorUnavailableError: The actor abc is unavailable", "UNAVAILABLE"),
    ("internal error (KeyError: 'h'); see the replica log", "INTERNAL"),  # a real bug stays INTERNAL
])
def test_a_hop_whose_replica_died_is_unavailable_to_the_caller(details, code):
    """Serve's proxy reports a replica that died mid-request as INTERNAL with Ray's message."""
    from services.status import HopError

    class Err(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INTERNAL

        def details(self):
            return details

    err = HopError("target 'default'", Err())
    assert err.code.name == code and details in str(err)


def test_the_client_retries_a_call_whose_replica_died_but_not_a_real_internal_error():
    from services.client import retryable

    class Err(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    assert retryable(Err(grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task."))
    assert not retryable(Err(grpc.StatusCode.INTERNAL, "internal error (KeyError: 'h'); see the replica log"))
    assert retryable(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "Request dropped due to backpressure (...)"))
    assert not retryable(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "context: 300 tokens exceed the limit of 256"))
