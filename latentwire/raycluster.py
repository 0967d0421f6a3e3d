"""Where a training job's Ray comes from: the cluster it was submitted to, or a local instance.

Called by `latentwire.jobs.launch` for every training job, so a job inside a RayJob or after
`ray start` joins that cluster (RAY_ADDRESS; a cluster sizes itself, so num_cpus is not passed) and
a job on a laptop starts its own instance.
"""

from __future__ import annotations

import os


def init_for_training(num_cpus: int, env: dict[str, str] | None = None) -> None:
    """ray.init for a training job, once per process. The local instance runs the dashboard: Ray
    Train's placement-group cleaner asks the State API, served by it, whether the job's controller is
    still alive (without it, it logs a failed query every few seconds and cannot clean up)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:  # our own local instance, even if someone else's runs on this machine
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=200 * 1024**2, include_dashboard=True,
                 runtime_env=runtime_env)
