"""Faults: a model replica is killed (by its actor) while a load of requests runs.

Serve must replace the replica; the client retries idempotent requests (same request id) with
backoff inside each request's deadline; every request ends in an answer or a clear
UNAVAILABLE / DEADLINE_EXCEEDED, and none outlives its deadline.
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

from tests.conftest import free_port
from tests.serve_cluster import replicas, start_ray, tiny_config, wait_for

REQUESTS, CONCURRENCY, DEADLINE_S = 200, 8, 30.0
KILLS = {40: "target", 120: "source"}  # completed requests -> the app whose replica is killed then
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

        def kill_after_first_checkpoint():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not killed:
                ckpts = glob.glob(str(tmp_path / "ray" / "killed" / "**" / "train_state.json"), recursive=True)
                workers = list_actors(address=state_address(), filters=[("class_name", "=", "RayTrainWorker"),
                                                                        ("state", "=", "ALIVE")])
                if ckpts and len(workers) == 2:
                    steps = [json.load(open(c))["step"] for c in ckpts]
                    os.kill(workers[-1].pid, signal.SIGKILL)  # a crash: no cleanup, no Python exception
                    killed.update(pid=workers[-1].pid, after_step=max(steps))
                time.sleep(0.05)

        killer = threading.Thread(target=kill_after_first_checkpoint)
        killer.start()
        resumed = run(replace(cfg, name="killed"), progress=False)
        killer.join()
    finally:
        ray.shutdown()
    assert killed and killed["after_step"] < cfg.steps, killed  # killed mid-job, after a checkpoint
    assert resumed["steps"] == baseline["steps"] == cfg.steps  # the job finished
    for path in glob.glob(str(tmp_path / "ray" / "killed" / "**" / "bridge.safetensors"), recursive=True):
        PerceiverBridge.load(path)  # every checkpoint left on storage is whole (sha256 matches its manifest)
    a, b = baseline["final_metrics"], resumed["final_metrics"]
    record = {k: (round(a[k], 5), round(b[k], 5)) for k in ("train_nll", "val_nll", "val_rms_ratio") if k in a}
    print("\nworker-kill test:", json.dumps({"killed_after_step": killed["after_step"], "steps": cfg.steps,
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


def test_killing_model_replicas_under_load_loses_no_request(cluster):
    """The target replica is killed after 40 answers, the source replica (the ingress app) after 120."""
    import ray

    from services.client import LatentWireClient

    before = {app: replicas(app) for app in KILLS.values()}
    assert all(len(v) == 1 for v in before.values())
    outcomes: collections.Counter = collections.Counter()
    over_deadline, lock = [], threading.Lock()
    reached = {n: threading.Event() for n in KILLS}
    killed: dict = {}
    details: dict = {}  # one message per non-OK status, for the record

    def one(i: int, client: LatentWireClient):
        t0 = time.monotonic()
        try:
            reply = client.ask(CONTEXT, QUESTION, "latent" if i % 2 else "none", max_new_tokens=4,
                               request_id=f"load-{i}", timeout=DEADLINE_S)
            assert reply.answer_tokens > 0 and reply.request_id == f"load-{i}"
            status = "OK"
        except grpc.RpcError as err:
            status = err.code().name
            details.setdefault(status, err.details())
        elapsed = time.monotonic() - t0
        with lock:
            outcomes[status] += 1
            if elapsed > DEADLINE_S + 2.0:
                over_deadline.append((i, elapsed))
            if sum(outcomes.values()) in reached:
                reached[sum(outcomes.values())].set()

    def killer():
        for n, app in KILLS.items():
            reached[n].wait(180)
            actor = replicas(app)[0]
            killed[app] = dict(actor_id=actor.actor_id, after=sum(outcomes.values()))
            ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace), no_restart=True)

    t_start = time.monotonic()
    with LatentWireClient(cluster, timeout_s=DEADLINE_S) as client:
        client.ask(CONTEXT, QUESTION, "none", max_new_tokens=2)  # warm-up
        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda i: one(i, client), range(REQUESTS)))
        kill_thread.join()
        wall = time.monotonic() - t_start
        # Serve replaced both replicas: new actors, and requests succeed through them
        after = {app: wait_for(lambda app=app: [a for a in replicas(app) if a.actor_id != killed[app]["actor_id"]],
                               60, f"a replacement {app} replica") for app in KILLS.values()}
        assert client.ask(CONTEXT, QUESTION, "latent", max_new_tokens=3).answer_tokens > 0
    record = dict(requests=REQUESTS, concurrency=CONCURRENCY, killed={a: k["after"] for a, k in killed.items()},
                  outcomes=dict(outcomes), retries=client.retries, over_deadline=len(over_deadline),
                  wall_s=round(wall, 1), details=details)
    print("\nkill test:", json.dumps(record))
    assert sum(outcomes.values()) == REQUESTS
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, outcomes  # clear statuses only
    assert not over_deadline, over_deadline  # none hung past its deadline
    assert outcomes["OK"] >= REQUESTS * 0.9, outcomes  # retries turn the outages into answers
    for app in KILLS.values():
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
