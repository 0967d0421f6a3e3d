"""Shared fixtures: tiny twins of the production pair, a calibrated tiny bridge, free ports."""

from __future__ import annotations

import socket

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_source():
    from latentwire.runtime import AgentModel

    return AgentModel("tiny-llama")


@pytest.fixture(scope="session")
def tiny_target():
    from latentwire.runtime import AgentModel

    return AgentModel("tiny-mistral")


@pytest.fixture(scope="session")
def tiny_bridge_path(tmp_path_factory, tiny_source, tiny_target):
    """A calibrated (untrained) tiny-llama -> tiny-mistral bridge with K=4 soft tokens."""
    from bridge.calibrate import calibrate

    bridge = calibrate(tiny_source, tiny_target, num_queries=4, n_texts=8, progress=False)
    path = tmp_path_factory.mktemp("bridge") / "tiny.safetensors"
    bridge.save(path)
    return path
