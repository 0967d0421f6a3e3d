"""A deployment loads weights only from safetensors whose sha256 matches their manifest.

The bridge servicer is the class the Serve deployment runs (no Ray needed to construct it): given
`weights:` that are tampered with, pickled, renamed or without a manifest, it refuses to start with
a message naming the file and the reason, so a replica never serves weights nobody vouched for.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from latentwire import codec
from latentwire.weights import WeightsError
from protos.latentwire.v1 import latentwire_pb2 as pb


def servicer(path):
    from services.bridge_service import BridgeServicer

    return BridgeServicer({"weights": str(path), "threads": 1})


@pytest.fixture()
def weights(tiny_bridge_path, tmp_path):
    """A private copy of the tiny bridge (+ manifest) that each test may damage."""
    dst = tmp_path / "bridge.safetensors"
    shutil.copy(tiny_bridge_path, dst)
    shutil.copy(tiny_bridge_path.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_good_weights_serve(weights):
    """Vouched-for weights load and translate a packet (its batcher needs no Serve replica)."""
    s = servicer(weights)
    packet = pb.HiddenStatePacket(hidden=codec.encode(torch.randn(5, 64)), provenance=pb.Provenance(
        source_model="tiny-llama", source_layer=2, source_hidden_size=64))
    reply = asyncio.run(s.Translate(packet))
    assert list(reply.latent.soft_tokens.shape) == [4, 96] and reply.latent.provenance.bridge_sha256 == s.bridge.sha256
    soft = s.translate_many([torch.randn(5, 64)])[0]
    assert tuple(soft.shape) == (4, 96)
    assert s.bridge.sha256 == json.loads(weights.with_suffix(".json").read_text())["sha256"]


def test_a_flipped_byte_is_refused(weights):
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        servicer(weights)


def test_weights_without_a_manifest_are_refused(weights):
    weights.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="missing"):
        servicer(weights)


def test_a_manifest_vouching_for_other_weights_is_refused(weights):
    man = json.loads(weights.with_suffix(".json").read_text())
    man["sha256"] = "0" * 64
    weights.with_suffix(".json").write_text(json.dumps(man))
    with pytest.raises(WeightsError, match="does not match"):
        servicer(weights)


@pytest.mark.parametrize("name", ["bridge.pt", "bridge.bin", "bridge.pkl", "bridge.ckpt"])
def test_pickled_or_renamed_weights_are_refused_before_any_read(weights, tmp_path, name, monkeypatch):
    bad = tmp_path / "renamed" / name
    bad.parent.mkdir()
    torch.save({"w": torch.zeros(2)}, bad)  # a pickle, the format that can run code when loaded
    shutil.copy(weights.with_suffix(".json"), bad.with_suffix(".json"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) was called"))
    with pytest.raises(WeightsError, match="only .safetensors"):
        servicer(bad)


def test_weights_and_manifest_rewritten_together_are_refused_by_the_pinned_digest(weights, tmp_path):
    """Whoever can write the weights volume can rewrite a manifest beside them; a digest pinned in
    the Serve config is out of their reach."""
    from services.bridge_service import BridgeServicer

    pinned = json.loads(weights.with_suffix(".json").read_text())["sha256"]
    assert BridgeServicer({"weights": str(weights), "threads": 1, "weights_sha256": pinned}).bridge.sha256 == pinned
    from latentwire import weights as w

    tensors, man = w.load(weights)
    tensors = {k: (v + 1 if v.is_floating_point() else v) for k, v in tensors.items()}
    w.save(weights, tensors, kind=man["kind"], config=man["config"])  # a consistent, different pair
    with pytest.raises(WeightsError, match="pinned in the configuration"):
        BridgeServicer({"weights": str(weights), "threads": 1, "weights_sha256": pinned})


def test_the_bytes_hashed_are_the_bytes_loaded(weights, monkeypatch):
    """One read: a file swapped after the hash cannot be what is parsed."""
    from pathlib import Path

    from latentwire import weights as w

    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail(f"a second read of {a[0]}"))
    w.load(weights, kind="bridge")
    assert reads == [weights.name]


@pytest.mark.parametrize("name", ["local.yaml", "local-fmkvc.yaml"])
def test_local_configs_pin_the_packaged_weights_digests(name):
    from bridge.load import default_weights_path
    from compression.sidecar import default_weights_path as sidecar_path
    from services import local

    cfg = local.load_config(local.DEFAULT_CONFIG.parent / name)
    apps = {a["name"]: a["args"] for a in cfg["applications"]}
    assert apps["bridge"]["weights_sha256"] == json.loads(default_weights_path().with_suffix(".json").read_text())["sha256"]
    for args in apps.values():
        kv = args.get("kv_compression")
        if kv and kv.get("method") == "fmkvc":
            packaged = sidecar_path(args["profile"]).with_suffix(".json")
            assert kv["weights_sha256"] == json.loads(packaged.read_text())["sha256"]


def test_a_hub_profile_loads_a_pinned_commit():
    from latentwire import profiles

    for p in profiles.PROFILES.values():
        if p.kind == "hub":
            assert profiles.hub_revision(p, None) == {"revision": p.revision} and len(p.revision) == 40
            assert profiles.hub_revision(p, "/mnt/models/x") == {}  # a local copy: the operator's bytes
    unpinned = profiles.ModelProfile("x", "llama", "hub", hf_id="org/model")
    with pytest.raises(ValueError, match="pinned commit"):
        profiles.hub_revision(unpinned, None)
