"""Banded SDPA (latentwire/attention.py): the same attention as SDPA, without the pairs masks drop."""

from __future__ import annotations

import pytest
import torch

from latentwire import attention, profiles
from tests.conftest import tiny_gemma3


def _sliding_mask(n: int, window: int, pad: int = 0) -> torch.Tensor:
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    mask = (k <= q) & (q - k < window) & (k >= pad)
    return mask[None, None]


def test_key_spans_of_a_sliding_window_mask():
    spans = attention.key_spans(_sliding_mask(96, 24), 16)
    assert spans == [(q0, q0 + 16, max(0, q0 - 23), q0 + 16) for q0 in range(0, 96, 16)]
    # two batch rows: a chunk keeps every column either row may see (the left-padded row sees fewer)
    both = torch.cat([_sliding_mask(96, 24), _sliding_mask(96, 24, pad=40)])
    assert attention.key_spans(both, 16) == spans
    # rows that see nothing keep the whole width, as the kernel saw them before
    assert attention.key_spans(torch.zeros(1, 1, 32, 32, dtype=torch.bool), 16) == [(0, 16, 0, 32), (16, 32, 0, 32)]


def _tiny_mistral(window: int):
    model, _ = profiles.load("tiny-mistral")
    model.config.sliding_window = window
    return model


@pytest.mark.parametrize("which", ["gemma3", "mistral"])
def test_banded_sdpa_gives_the_sdpa_logits_and_skips_the_masked_pairs(which, monkeypatch):
    """Past the sliding window, in one prompt and in a left-padded batch: the logits of SDPA, with
    calls over fewer keys than the prompt has (the band of each chunk of queries)."""
    model = tiny_gemma3() if which == "gemma3" else _tiny_mistral(40)
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    n = 160
    ids = torch.randint(3, model.config.vocab_size, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :50] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    calls = []
    inner = attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return inner(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "CHUNK", 32)
    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    attention.enable(model)
    assert model.config._attn_implementation == attention.NAME
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1))[real].all()
    assert any(k < n and q == 32 for q, k in calls)  # the band ran: chunks of queries over part of the keys
    assert sum(q * k for q, k in calls) < model.config.num_hidden_layers * n * n  # fewer pairs than before


def test_enable_leaves_other_attentions_alone():
    model = tiny_gemma3()
    model.set_attn_implementation("eager")
    attention.enable(model)
    assert model.config._attn_implementation == "eager"
