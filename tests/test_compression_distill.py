"""End-to-end distillation of the sidecar: exact where compression is exact, only the sidecar learns."""

import pytest
import torch

from compression import attention
from compression.cache import Schedule
from compression.distill import distill_loss, documents
from compression.sidecar import Sidecar, SidecarConfig
from latentwire import profiles

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def frozen():
    model, tok = profiles.load("tiny-llama")
    model.requires_grad_(False)
    attention.enable(model)
    return model, tok


def _sidecar(model, seed=0):
    torch.manual_seed(seed)
    c = model.config
    return Sidecar(SidecarConfig(head_dim=c.head_dim, n_layers=c.num_hidden_layers,
                                 n_kv_heads=c.num_key_value_heads, d_model=32, n_heads=2))


def test_windows_of_one_token_distil_to_zero_kl(frozen):
    model, tok = frozen
    doc = documents(tok, 1, 96)[0]
    with torch.no_grad():  # W=1: the untrained sidecar returns each token itself, so nothing is lost
        assert float(distill_loss(model, _sidecar(model), doc, 80, Schedule(1, 2, 8))) < 1e-6
        assert float(distill_loss(model, _sidecar(model), doc, 80, Schedule(4, 2, 8))) > 1e-5


def test_distillation_lowers_kl_and_moves_only_the_sidecar(frozen):
    model, tok = frozen
    doc = documents(tok, 1, 96)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sidecar = _sidecar(model, seed=1)
    opt = torch.optim.Adam(sidecar.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        kl = distill_loss(model, sidecar, doc, 80, Schedule(4, 2, 8))
        opt.zero_grad()
        kl.backward()
        opt.step()
        losses.append(float(kl.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert sidecar.delta_k.weight.abs().sum() > 0  # it learned (deltas start at zero)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_unfrozen_model_is_refused():
    model, tok = profiles.load("tiny-mistral")
    model.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="frozen model"):
            distill_loss(model, _sidecar(model), documents(tok, 1, 40)[0], 32, Schedule(4, 2, 8))
    finally:
        model.requires_grad_(False)
