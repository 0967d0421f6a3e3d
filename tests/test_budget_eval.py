"""`latentwire eval --budgets` (bridge/budgets.py): EM against the message budget, per mode, on tiny models."""

from __future__ import annotations

import pytest


def test_budgets_parse_and_refuse_what_is_not_a_budget():
    from bridge.budgets import parse_budgets

    assert parse_budgets("8, 16,full") == [8, 16, None]
    for bad in ("0", "-4", "many"):
        with pytest.raises(ValueError, match="--budgets"):
            parse_budgets(bad)


def test_every_budgeted_mode_is_scored_and_plotted(tiny_source, tiny_target, tiny_bridge_path, tmp_path):
    from bridge import budgets
    from bridge.load import load_bridge
    from bridge.records import generate
    from latentwire.selection import make_selector

    items = generate(2, "val", seed=2, tokens=60, facts=2)
    result = budgets.evaluate(items, tiny_source, tiny_target, load_bridge(tiny_bridge_path), make_selector("lexical"),
                              budgets=[4, None], text_budgets=[4], max_new_tokens=2, nll=True, progress=False)
    modes = result["modes"]
    assert set(modes) == {"latent@4", "latent@full", "extract@4", "text@4", "direct", "none"}
    assert modes["extract@4"]["message_tokens"] == 4 and modes["text@4"]["message_tokens"] <= 4
    assert modes["latent@4"]["message_tokens"] == 4  # the tiny Perceiver bridge's K
    # the target prefills the primer, the message and the question: the context only in DIRECT
    assert modes["none"]["target_tokens"] < modes["extract@4"]["target_tokens"] < modes["direct"]["target_tokens"]
    assert all(0 <= m["em"] <= 1 and "transfer_ratio" in m for m in modes.values())
    assert len(result["items"]) == 2 and set(result["items"][0]) >= {"latent@4", "extract@4", "direct"}
    png = budgets.plot(result, tmp_path / "em.png")
    assert png.stat().st_size > 5_000
    assert "extract@4" in budgets.table(result)
