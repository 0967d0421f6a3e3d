"""A training job joins the cluster it was submitted to, or starts a local instance with the dashboard."""

import ray

from latentwire.raycluster import init_for_training


def _calls(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    return calls


def test_a_job_inside_a_cluster_joins_it_without_sizing_it(monkeypatch):
    calls = _calls(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_for_training(num_cpus=2, env={"OMP_NUM_THREADS": "1"})
    # ray.init refuses num_cpus when it connects to an existing cluster
    assert calls == [{"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}]


def test_a_job_on_its_own_starts_a_local_instance_with_the_state_api(monkeypatch):
    calls = _calls(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_for_training(num_cpus=3)
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 3
    assert calls[0]["include_dashboard"] is True  # Ray Train's placement-group cleaner queries it
