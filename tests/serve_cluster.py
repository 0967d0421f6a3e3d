"""Helpers for the tests that start a real Serve cluster with the tiny pair (faults, fuzz, auth).

Not a test module: `tiny_config` is deploy/local.yaml with the tiny twins swapped in (as in
tests/test_service_grpc.py); `replicas` reads the replica actors from Ray's state API.
"""

from __future__ import annotations

import time

TINY_BRIDGE_ID = "tiny-llama@2->tiny-mistral/K4"
TOKEN_ENV = "LATENTWIRE_AUTH_TOKEN"
INTERNAL_TOKEN_ENV = "LATENTWIRE_INTERNAL_TOKEN"
RAY_INIT = dict(num_cpus=2, object_store_memory=200 * 1024**2, log_to_driver=False)


def start_ray(**kw) -> None:
    """A local Ray with its dashboard: Ray's state API (list_actors/list_nodes) is served by it."""
    import ray

    from tests.conftest import free_port

    # address="local": always a new instance, never the latest cluster some other process started
    ray.init(address="local", namespace="serve", include_dashboard=True, dashboard_port=free_port(),
             **{**RAY_INIT, **kw})


def tiny_config(bridge_path, grpc_port: int, http_port: int, *, token: str | None = None,
                internal_token: str | None = None, base: dict | None = None) -> dict:
    """deploy/local.yaml (or `base`) on the given ports with the tiny pair; `token` turns auth on
    (clients' token) and then needs `internal_token` (the services' hops and packet signatures)."""
    from services import local

    cfg = local.with_port(base or local.load_config(), grpc_port, http_port)
    apps = {a["name"]: a for a in cfg["applications"]}
    apps["source"]["args"].update(profile="tiny-llama", source_layer=2, threads=1, message_tokens=8,
                                  limits={"max_context_tokens": 256, "max_new_tokens": 32})
    apps["target"]["args"].update(profile="tiny-mistral", threads=1, accepted_bridges=[TINY_BRIDGE_ID])
    import json
    from pathlib import Path

    digest = json.loads(Path(bridge_path).with_suffix(".json").read_text())["sha256"]
    apps["bridge"]["args"].update(weights=str(bridge_path), weights_sha256=digest)  # pinned, as deployed
    for app in apps.values():  # one replica an app: the fault tests kill "the" replica of an app
        app["deployments"][0]["num_replicas"] = 1
    # the tokens reach the replicas through their environment only
    for app in cfg["applications"]:
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        if token is not None:
            app["args"]["auth"] = {"required": True, "token_env": TOKEN_ENV, "internal_token_env": INTERNAL_TOKEN_ENV}
            env[TOKEN_ENV] = token
        if internal_token is not None:
            env[INTERNAL_TOKEN_ENV] = internal_token
    return cfg


def state_address() -> str:
    """This driver's cluster (other engineers' Ray instances may run on the same machine)."""
    import ray

    return ray.get_runtime_context().gcs_address


def replicas(app: str | None = None) -> list:
    """ALIVE Serve replica actors (of one application, or all), from Ray's state API."""
    from ray.util.state import list_actors

    alive = list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], limit=10_000,
                        raise_on_missing_output=False)
    prefix = f"ServeReplica:{app}:" if app else "ServeReplica:"
    return sorted((a for a in alive if a.class_name.startswith(prefix)), key=lambda a: a.actor_id)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout_s:.0f} s")
        time.sleep(poll_s)
