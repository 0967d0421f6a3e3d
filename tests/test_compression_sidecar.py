"""Sidecar: hard normalisation by construction, mean-pool start, sha-checked weights."""

import pytest
import torch

from compression.sidecar import Sidecar, SidecarConfig
from latentwire.weights import WeightsError

torch.set_num_threads(1)


def _sidecar(seed=0, perturb=True, **cfg):
    torch.manual_seed(seed)
    sc = Sidecar(SidecarConfig(head_dim=32, n_layers=3, n_kv_heads=2, d_model=32, n_heads=2, **cfg))
    if perturb:  # move away from the mean-pool initialisation so the test means something
        for p in sc.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    return sc


def test_output_norms_equal_window_mean_norms():
    sc = _sidecar()
    k = torch.randn(50, 8, 32) * torch.rand(50, 8, 1) * 20  # very different scales per token and window
    v = torch.randn(50, 8, 32) * 3
    kt, vt = sc(k, v, torch.randint(0, 6, (50,)))
    torch.testing.assert_close(kt.norm(dim=-1), k.norm(dim=-1).mean(-1))
    torch.testing.assert_close(vt.norm(dim=-1), v.norm(dim=-1).mean(-1))
    assert not torch.allclose(kt / kt.norm(dim=-1, keepdim=True),
                              torch.nn.functional.normalize(k.mean(1), dim=-1), atol=1e-2)


def test_bounded_value_norm_never_exceeds_the_window_mean_and_starts_as_the_pooled_norm():
    k = torch.randn(50, 8, 32)
    v = torch.randn(50, 8, 32) * torch.rand(50, 8, 1) * 5
    mean_norm = v.norm(dim=-1).mean(-1)
    _, vt = _sidecar(value_norm="bounded")(k, v, torch.randint(0, 6, (50,)))
    assert bool((vt.norm(dim=-1) <= mean_norm * (1 + 1e-5)).all())
    with torch.no_grad():  # untrained: mean of v/mean|v|, rescaled
        _, vt0 = _sidecar(perturb=False, value_norm="bounded")(k, v, 0)
    torch.testing.assert_close(vt0, (v / mean_norm[:, None, None]).mean(1) * mean_norm[:, None])
    assert float(vt0.norm(dim=-1).mean()) < 0.6 * float(mean_norm.mean())  # random values: it shrinks
    with pytest.raises(ValueError, match="value_norm"):
        _sidecar(value_norm="loose")


def test_sidecars_saved_before_proportional_attention_load_as_plain(tmp_path):
    import json

    _sidecar().save(tmp_path / "old.safetensors")
    manifest = json.loads((tmp_path / "old.json").read_text())
    for key in ("proportional", "value_norm"):  # keys a manifest written before these options existed lacks
        del manifest["config"][key]
    (tmp_path / "old.json").write_text(json.dumps(manifest))
    old = Sidecar.load(tmp_path / "old.safetensors")
    assert old.cfg.proportional is False and old.cfg.value_norm == "fixed"
    _sidecar().save(tmp_path / "new.safetensors")
    assert Sidecar.load(tmp_path / "new.safetensors").cfg.proportional is True


def test_untrained_sidecar_is_normalised_mean_pooling():
    sc = _sidecar(perturb=False)
    k, v = torch.randn(10, 4, 32), torch.randn(10, 4, 32)
    kt, vt = sc(k, v, 0)
    kh = k / k.norm(dim=-1).mean(-1)[:, None, None]
    expected = torch.nn.functional.normalize(kh.mean(1), dim=-1) * k.norm(dim=-1).mean(-1, keepdim=True)
    torch.testing.assert_close(kt, expected, atol=1e-5, rtol=1e-5)


def test_window_size_free_and_gradients_flow():
    sc = _sidecar()
    for w in (2, 4, 16):
        kt, vt = sc(torch.randn(3, w, 32), torch.randn(3, w, 32), 1)
        assert kt.shape == vt.shape == (3, 32)
    (kt.sum() + vt.sum()).backward()
    assert sc.seeds.grad is not None and sc.delta_k.weight.grad.abs().sum() > 0


def test_save_load_roundtrip_and_tamper_refused(tmp_path):
    sc = _sidecar()
    man = sc.save(tmp_path / "s.safetensors", metrics={"x": 1})
    loaded = Sidecar.load(tmp_path / "s.safetensors")
    k, v = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    torch.testing.assert_close(loaded(k, v, 2)[0], sc.eval()(k, v, 2)[0])
    assert loaded.manifest["sha256"] == man["sha256"] and loaded.cfg.head_dim == 32
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "s.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError):
        Sidecar.load(tmp_path / "s.safetensors")
