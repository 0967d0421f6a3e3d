"""Serve application builders: what `import_path` in a Serve config points at.

Placement (replicas, CPUs/GPUs, autoscaling) lives in the config's `deployments:` section, not
here; `args:` are validated by the pydantic settings models before any replica starts.
"""

from __future__ import annotations

from ray import serve

from latentwire.settings import AgentSettings, BridgeSettings

# Replica defaults for a laptop-sized local cluster; configs override them per deployment. Serve's
# controller learns that a replica died (and starts its replacement) from a failed health check only:
# every 2 s rather than Serve's 10, so a killed replica is replaced seconds sooner while requests wait.
_LOCAL = dict(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, health_check_period_s=2)


def agent_app(args: dict) -> serve.Application:
    from services.a2a import A2AAgentServicer  # AgentServicer plus the A2A RPCs (services.a2a)

    class Agent(A2AAgentServicer):
        """The agent servicer with its sessions routed by Serve's model multiplexing: each session
        turn loads its session id as a multiplexed "model" on this replica (LRU, as many as
        `sessions.max_sessions`), so calls carrying the id as `multiplexed_model_id` come here."""

        def __init__(self, settings: dict):
            super().__init__(settings)

            async def hold(session_id: str) -> str:
                return session_id

            self.hold_session = serve.multiplexed(max_num_models_per_replica=self.settings.sessions.max_sessions)(hold)

    settings = AgentSettings.model_validate(args)
    return serve.deployment(Agent, name="Agent", **_LOCAL).bind(settings.model_dump())


def bridge_app(args: dict) -> serve.Application:
    from services.bridge_service import BridgeServicer

    settings = BridgeSettings.model_validate(args)
    return serve.deployment(BridgeServicer, name="Bridge", **_LOCAL).bind(settings.model_dump())
