"""Proportional attention: a super-token counts as the W tokens it replaces (log W score bias)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from compression import attention
from compression.cache import FMKVCCache, Schedule
from compression.methods.mean_pool import mean_pool_compressor, mean_pool_mass_compressor
from compression.losses import fmkvc_loss, force
from latentwire import profiles

torch.set_num_threads(1)


def _window_case(w=4, length=20, start=6, seed=0):
    """Keys/values where positions [start, start + w) are one token repeated w times."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 3, 16, generator=g)  # (B, heads, queries, D)
    k, v = torch.randn(1, 2, length, 16, generator=g), torch.randn(1, 2, length, 16, generator=g)
    k[:, :, start:start + w] = k[:, :, start:start + 1]
    v[:, :, start:start + w] = v[:, :, start:start + 1]
    keep = [i for i in range(length) if not start < i < start + w]  # the window -> its first token
    return q, k, v, keep


@pytest.mark.parametrize("mask_kind", ["none_in_decode", "bool"])
def test_super_token_of_a_repeated_window_reproduces_the_window_exactly(mask_kind):
    w, start = 4, 6
    q, k, v, keep = _window_case(w, start=start)
    if mask_kind == "none_in_decode":  # transformers passes no mask for one new token: it sees everything
        q = q[:, :, :1]
    module = SimpleNamespace(layer_idx=3, is_causal=True, num_key_value_groups=1)
    n_q, n_d, n_c = q.shape[-2], k.shape[-2], len(keep)
    dense_mask = coarse_mask = None
    if mask_kind == "bool":  # queries are the last positions; nothing is masked but the future
        dense_mask = (torch.arange(n_d)[None] <= torch.arange(n_q)[:, None] + n_d - n_q)[None, None]
        coarse_mask = (torch.arange(n_c)[None] <= torch.arange(n_q)[:, None] + n_c - n_q)[None, None]
    dense, _ = attention.proportional_sdpa(module, q, k, v, dense_mask, scaling=0.25)
    log_count = torch.zeros(start + 1)
    log_count[start] = math.log(w)
    attention.publish(3, log_count)
    coarse, _ = attention.proportional_sdpa(module, q, k[:, :, keep], v[:, :, keep], coarse_mask, scaling=0.25)
    torch.testing.assert_close(coarse, dense, atol=1e-6, rtol=1e-5)
    plain, _ = attention.proportional_sdpa(module, q, k[:, :, keep], v[:, :, keep], coarse_mask, scaling=0.25)
    assert (plain - dense).abs().max() > 1e-3  # the bias was used once, then gone: one token's mass again


def test_loss_is_zero_for_the_repeated_window_only_with_its_log_mass():
    w, sink = 4, 2
    q, k, v, _ = _window_case(w, length=16, start=sink, seed=1)
    q, k, v = q[0, :1], k[0, :1], v[0, :1]  # one (layer, head) row: (1, Q, D), (1, L, D)
    qpos = torch.arange(13, 16)
    g = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    s = torch.einsum("nqd,nld->nql", q, k) * 0.25
    p = torch.softmax(s.masked_fill(~(torch.arange(16)[None] <= qpos[:, None])[None], -1e30), -1)
    f_ref = force(p, k, v, g, 0.25)
    kt, vt = k[:, sink:sink + 1], v[:, sink:sink + 1]
    args = (q, k, v, g, f_ref, kt, vt, qpos)
    exact = fmkvc_loss(*args, sink=sink, end=sink + w, scale=0.25, log_mass=math.log(w))
    single = fmkvc_loss(*args, sink=sink, end=sink + w, scale=0.25, log_mass=0.0)
    assert float(exact["loss"]) < 1e-8 and abs(float(exact["mass_ratio"]) - 1) < 1e-5
    assert float(single["loss"]) > 1e-4 and float(single["mass_ratio"]) < 0.9


def test_a_proportional_compressor_is_refused_without_proportional_attention():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="proportional attention"):
        FMKVCCache(cfg, Schedule(8, 4, 16), mean_pool_mass_compressor)
    FMKVCCache(cfg, Schedule(8, 4, 16), mean_pool_compressor)  # plain super-tokens need nothing


def _logits(model, ids, cache, n_prefill):
    with torch.no_grad():
        outs = [model(ids[:, :n_prefill], past_key_values=cache).logits]
        for t in range(n_prefill, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(outs, 1)[:, n_prefill:]


def test_proportional_attention_is_sdpa_until_super_tokens_exist_and_then_tracks_dense_closer():
    model, _ = profiles.load("tiny-llama")
    ids = torch.randint(3, 290, (1, 200), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids, DynamicCache(config=model.config), 180)
    attention.enable(model)
    assert torch.equal(_logits(model, ids, DynamicCache(config=model.config), 180), before)
    plain = _logits(model, ids, FMKVCCache(model.config, Schedule(8, 4, 16), mean_pool_compressor), 180)
    mass = _logits(model, ids, FMKVCCache(model.config, Schedule(8, 4, 16), mean_pool_mass_compressor), 180)
    assert (mass - before).abs().max() < 0.5 * (plain - before).abs().max()
