"""The Perceiver bridge: shapes, calibrated output scale, padding, and weights that refuse tampering."""

import json

import pytest
import torch

from bridge.eval import soft_token_stats
from bridge.load import default_weights_path, load_bridge
from bridge.perceiver import PerceiverBridge, PerceiverConfig
from latentwire.profiles import get_profile
from latentwire.weights import WeightsError


def test_shapes_and_variable_length_input():
    b = PerceiverBridge(PerceiverConfig("a", "b", 2, d_src=48, d_tgt=80, num_queries=6, d_model=32, n_heads=4)).eval()
    out = b(torch.randn(3, 17, 48), torch.ones(3, 17))
    assert out.shape == (3, 6, 80)
    assert b(torch.randn(1, 5, 48)).shape == (1, 6, 80)


def test_padding_does_not_change_the_soft_tokens():
    b = PerceiverBridge(PerceiverConfig("a", "b", 2, d_src=16, d_tgt=24, num_queries=3, d_model=32)).eval()
    h = torch.randn(1, 5, 16)
    padded = torch.cat([h, torch.randn(1, 4, 16) * 100], 1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    assert torch.allclose(b(h), b(padded, mask), atol=1e-5)


def test_calibrated_bridge_matches_the_target_embedding_rms(tiny_source, tiny_target, tiny_bridge_path):
    bridge = PerceiverBridge.load(tiny_bridge_path)
    ids = tiny_source.tokenize("The quick brown fox jumps over the lazy dog.")
    soft = bridge(tiny_source.hidden_states(ids, bridge.cfg.source_layer)[None])
    stats = soft_token_stats(soft, tiny_target.embed_rms())
    assert 0.5 < stats["rms_ratio"] < 2.0
    assert soft.shape == (1, 4, tiny_target.hidden_size)


def test_save_load_round_trip_and_tamper_refusal(tmp_path):
    b = PerceiverBridge(PerceiverConfig("a", "b", 2, d_src=16, d_tgt=24, num_queries=3, d_model=32))
    man = b.save(tmp_path / "b.safetensors", metrics={"em": 0.5})
    loaded = PerceiverBridge.load(tmp_path / "b.safetensors")
    assert loaded.sha256 == man["sha256"] and loaded.bridge_id == "a@2->b/K3"
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), loaded.state_dict().values()))
    data = bytearray((tmp_path / "b.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "b.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        PerceiverBridge.load(tmp_path / "b.safetensors")


def test_non_safetensors_weights_are_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(WeightsError, match="safetensors"):
        PerceiverBridge.load(tmp_path / "b.pt")


def test_packaged_bridge_is_for_the_embedded_pair():
    manifest = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert (manifest["config"]["source_model"], manifest["config"]["target_model"]) == ("smollm2-135m", "gemma3-270m")
    bridge = load_bridge(default_weights_path())  # reads its vocabulary rows from the target's weights
    assert bridge.sha256 == manifest["sha256"]
    assert bridge.cfg.source_layer == get_profile("smollm2-135m").source_layer  # what the source sends


def test_bridge_service_batches_packets_of_different_lengths_exactly(tiny_bridge_path):
    """The bridge replica's padded, masked batch gives each packet its own soft tokens."""
    from services.bridge_service import BridgeServicer

    svc = BridgeServicer(dict(weights=str(tiny_bridge_path), threads=1))
    torch.manual_seed(0)
    hiddens = [torch.randn(t, svc.cfg.d_src) for t in (5, 9, 1)]
    batched = svc.translate_many(hiddens)
    with torch.no_grad():
        single = [svc.bridge(h[None])[0] for h in hiddens]
    assert [tuple(b.shape) for b in batched] == [(svc.cfg.num_queries, svc.cfg.d_tgt)] * 3
    for b, s in zip(batched, single):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-4)
