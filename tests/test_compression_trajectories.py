"""Trajectory shards: collected from a real (tiny) model, streamed back intact, sha-checked,
and physically consistent (recorded force dL/dq equals J^T dL/do from the recorded K, V, q)."""

import json

import pytest
import torch
from transformers.utils import logging as hf_logging

from compression import trajectories as tj
from compression.losses import attend, force
from latentwire import profiles
from latentwire.weights import WeightsError

hf_logging.disable_progress_bar()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    model, tok = profiles.load("tiny-llama")
    out = tmp_path_factory.mktemp("traj")
    man = tj.collect(model, tok, out, profile="tiny-llama", n_samples=5, length=96, n_queries=8, shard_size=2,
                     log=lambda *_: None)
    return model, out, man


def test_manifest_and_shards(collected):
    model, out, man = collected
    assert man["samples"] == 5 and [s["samples"] for s in man["shards"]] == [2, 2, 1]
    disk = json.loads((out / "manifest.json").read_text())
    assert disk["n_layers"] == 4 and disk["n_kv_heads"] == 2 and disk["head_dim"] == 16
    assert disk["scaling"] == pytest.approx(16 ** -0.5)


def test_round_trip_streams_every_sample(collected):
    _, out, _ = collected
    samples = list(tj.iter_samples(out))
    assert len(samples) == 5
    s = samples[0]
    assert s["K"].shape == (4, 2, 96, 16) and s["K"].dtype == torch.float16
    assert s["Q"].shape == s["F"].shape == s["G"].shape == (4, 4, 8, 16)
    assert bool((s["qpos"] >= 48).all()) and s["F"].abs().sum() > 0
    shuffled = list(tj.iter_samples(out, shuffle_seed=3))
    key = lambda x: float(x["K"].float().sum())  # noqa: E731
    assert sorted(map(key, shuffled)) == sorted(map(key, samples))


def test_recorded_force_is_consistent_with_recorded_keys_values_queries(collected):
    model, out, man = collected
    s = next(tj.iter_samples(out))
    layer, head = 2, 3
    kv = head // (man["n_q_heads"] // man["n_kv_heads"])
    k, v = s["K"][layer, kv].float()[None], s["V"][layer, kv].float()[None]
    q, g, f = s["Q"][layer, head][None], s["G"][layer, head][None], s["F"][layer, head][None]
    mask = (torch.arange(k.shape[1])[None] <= s["qpos"][:, None])[None]
    _, p = attend(q, k, v, mask, man["scaling"])
    rel = (force(p, k, v, g, man["scaling"]) - f).norm() / f.norm()
    assert rel < 0.02  # fp16 K/V storage


def test_tampered_shard_refused(collected, tmp_path):
    import shutil

    _, out, _ = collected
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "shard_0000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError):
        list(tj.iter_samples(copy))
