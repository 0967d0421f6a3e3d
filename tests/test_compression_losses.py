"""FMKVC losses: analytic Jacobian/force match autograd; zero when the super-token is exact."""

import torch

from compression.losses import attend, coarse_cache, fmkvc_loss, force, jacobian_probe

torch.set_num_threads(1)
SCALE = 0.25


def test_analytic_jacobian_and_force_match_autograd():
    torch.manual_seed(0)
    k, v = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    q = torch.randn(1, 3, 16, requires_grad=True)
    g, r = torch.randn(1, 3, 16), torch.randn(2, 16)
    o, p = attend(q, k, v, None, SCALE)
    (grad,) = torch.autograd.grad((o * g).sum(), q)
    torch.testing.assert_close(force(p, k, v, g, SCALE), grad, atol=1e-5, rtol=1e-4)
    for i in range(2):  # J r == d/dt o(q + t r)
        _, jvp = torch.autograd.functional.jvp(lambda x: attend(x, k, v, None, SCALE)[0], q.detach(),
                                               r[i].expand_as(q))
        torch.testing.assert_close(jacobian_probe(p, k, v, o, r, SCALE)[:, :, i], jvp, atol=1e-5, rtol=1e-4)


def _constructed_case(w=4, sink=2, length=24):
    """Every query points along u; inside the window only token 0 is visible, the other W-1 keys point
    against u so their attention underflows. The super-token (k_0, v_0) is then exact."""
    torch.manual_seed(1)
    d = 16
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    k, v = torch.randn(1, length, d), torch.randn(1, length, d)
    k[0, sink + 1:sink + w] = -200.0 * u
    qpos = torch.arange(length - 6, length)
    q = (torch.rand(1, 6, 1) + 0.5) * u + 0.01 * torch.randn(1, 6, d)
    g = torch.randn(1, 6, d)
    mask = (torch.arange(length)[None] <= qpos[:, None])[None]
    o, p = attend(q, k, v, mask, SCALE)
    f_ref = force(p, k, v, g, SCALE)
    return q, k, v, g, f_ref, qpos, sink, sink + w


def test_loss_is_zero_when_super_token_reproduces_dense_output():
    q, k, v, g, f_ref, qpos, sink, end = _constructed_case()
    kt, vt = k[:, sink:sink + 1].clone(), v[:, sink:sink + 1].clone()
    res = fmkvc_loss(q, k, v, g, f_ref, kt, vt, qpos, sink=sink, end=end, scale=SCALE)
    assert float(res["loss"]) < 1e-10
    assert abs(float(res["jacobian_norm_ratio"]) - 1) < 1e-5 and float(res["output_cosine"]) > 1 - 1e-6
    mean = fmkvc_loss(q, k, v, g, f_ref, k[:, sink:end].mean(1, keepdim=True), v[:, sink:end].mean(1, keepdim=True),
                      qpos, sink=sink, end=end, scale=SCALE)
    assert float(mean["loss"]) > 1e-3 and float(mean["jacobian"]) > 1e-4 and float(mean["force"]) > 1e-4


def test_coarse_cache_layout():
    k = torch.arange(10.0).view(1, 10, 1)
    kc, _ = coarse_cache(k, k, torch.tensor([[[-1.0], [-2.0]]]), torch.zeros(1, 2, 1), sink=2, end=8)
    assert kc.flatten().tolist() == [0, 1, -1, -2, 8, 9]
