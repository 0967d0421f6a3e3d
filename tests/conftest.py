"""Shared fixtures: tiny twins of the production pair (and a tiny Gemma 3), a calibrated tiny bridge, free ports."""

from __future__ import annotations

import socket

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


# Ports Ray binds by default after a test has picked its own (GCS, Serve HTTP/gRPC, dashboard, client,
# dashboard agent); the kernel's ephemeral range includes 52365, and one CI run drew it for Serve's gRPC.
RAY_DEFAULT_PORTS = {6379, 8000, 8265, 9000, 10001, 52365, 52366}
RAY_WORKER_PORTS = range(10002, 20000)


def free_port() -> int:
    """A free loopback port that none of Ray's own default listeners will take after we pick it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS and port not in RAY_WORKER_PORTS:
            return port


def tiny_gemma3():
    """A random Gemma 3 text model: sliding and full layers mixed (per-layer-type rotary frequencies), QK norm."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=64,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"], max_position_embeddings=1024)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_source():
    from latentwire.runtime import AgentModel

    return AgentModel("tiny-llama")


@pytest.fixture(scope="session")
def tiny_target():
    from latentwire.runtime import AgentModel

    return AgentModel("tiny-mistral")


def tiny_aligned_bridge(tiny_source, tiny_target):
    """An aligned bridge (bridge.aligned) for the tiny pair, fitted by ridge regression to random
    (source state, target embedding) pairs: a random map with the real projection, seeded."""
    import torch

    from bridge.align import AlignConfig, build_bridge, candidate_vocab, moments, solve

    torch.manual_seed(0)
    S, B = moments(torch.randn(50, tiny_source.hidden_size), torch.randn(50, tiny_target.hidden_size))
    return build_bridge(tiny_source, tiny_target, AlignConfig(), 2, solve(S, B, 1.0),
                        candidate_vocab(tiny_source, tiny_target))


@pytest.fixture(scope="session")
def tiny_bridge_path(tmp_path_factory, tiny_source, tiny_target):
    """A calibrated (untrained) tiny-llama -> tiny-mistral bridge with K=4 soft tokens."""
    from bridge.calibrate import calibrate

    bridge = calibrate(tiny_source, tiny_target, num_queries=4, n_texts=8, progress=False)
    path = tmp_path_factory.mktemp("bridge") / "tiny.safetensors"
    bridge.save(path)
    return path


@pytest.fixture(scope="module")
def client(cluster):
    """A gRPC client of the module's `cluster` fixture (the gRPC address of a served stack)."""
    from services.client import LatentWireClient

    with LatentWireClient(cluster, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for Ray Train jobs (2 CPUs: the jobs' two workers), unless one is running."""
    from pathlib import Path

    import ray

    started = not ray.is_initialized()
    if started:
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
    yield
    if started:
        ray.shutdown()
