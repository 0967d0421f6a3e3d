"""Start a Serve config on a local (or given) Ray cluster, the way `serve run CONFIG` does."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "local.yaml"


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def validate(config: dict[str, Any]):
    """Check a config against Serve's own schema and every app's args against our settings."""
    from ray.serve.schema import ServeDeploySchema

    from latentwire.settings import AgentSettings, BridgeSettings

    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        model = {"services.app:agent_app": AgentSettings, "services.app:bridge_app": BridgeSettings}.get(app.import_path)
        if model is not None:
            model.model_validate(app.args or {})
    return schema


def grpc_address(config: dict[str, Any]) -> str:
    return f"127.0.0.1:{config.get('grpc_options', {}).get('port', 9000)}"


def with_port(config: dict[str, Any], grpc_port: int, http_port: int | None = None) -> dict[str, Any]:
    """A copy of `config` on other ports (tests run beside a user's server); sources follow the proxy."""
    cfg = copy.deepcopy(config)
    cfg.setdefault("grpc_options", {})["port"] = grpc_port
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = http_port
    for app in cfg["applications"]:
        if app.get("import_path") == "services.app:agent_app" and "grpc_address" in (app.get("args") or {}):
            app["args"]["grpc_address"] = f"127.0.0.1:{grpc_port}"
    return cfg


def deploy(config: dict[str, Any], *, address: str | None = None, timeout_s: float = 600.0,
           ray_init: dict[str, Any] | None = None) -> None:
    """Start Serve with the config's proxy options, deploy its apps, wait until all are RUNNING."""
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    schema = validate(config)
    if not ray.is_initialized():
        ray.init(address=address, namespace="serve", include_dashboard=False, **(ray_init or {}))
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n in names if states[n] in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not RUNNING after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
