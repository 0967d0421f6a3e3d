"""Evaluation metrics on known inputs, and `latentwire eval` end to end on the tiny pair."""

import json
import math

import pytest
import torch

from bridge import eval as ev


def test_exact_match_is_normalised_whole_word_containment():
    assert ev.exact_match("Marco was born in 1989.", "1989") == 1.0
    assert ev.exact_match("  OSLO!", "Oslo") == 1.0
    assert ev.exact_match("March 10, 2016.", "March 10") == 1.0
    assert ev.exact_match("19890", "1989") == 0.0  # not a whole word
    assert ev.exact_match("Osloville", "Oslo") == 0.0
    assert ev.exact_match("", "Oslo") == 0.0
    assert ev.exact_match_strict("Oslo.", "oslo") == 1.0
    assert ev.exact_match_strict("in Oslo", "Oslo") == 0.0


def test_token_f1():
    assert ev.token_f1("March 10", "March 10") == 1.0
    assert ev.token_f1("on March 10", "March 10") == pytest.approx(0.8)  # p=2/3, r=1
    assert ev.token_f1("April", "March 10") == 0.0
    assert ev.token_f1("", "") == 1.0


def test_transfer_ratio_diversity_and_chance():
    assert ev.transfer_ratio(4.0, 4.0, 1.0) == 0.0
    assert ev.transfer_ratio(4.0, 1.0, 1.0) == 1.0
    assert ev.transfer_ratio(4.0, 2.5, 1.0) == pytest.approx(0.5)
    assert math.isnan(ev.transfer_ratio(2.0, 1.0, 2.0))
    assert ev.diversity(["Oslo", "oslo.", "Lima", "Rex"]) == 0.75
    items = [{"answer": a, "kind": k} for a, k in [("red", "c"), ("red", "c"), ("blue", "c"), ("7", "n")]]
    # colour group: p = (2/3, 1/3) -> sum p^2 = 5/9 over 3 items; number group: 1 over 1 item
    assert ev.chance_em(items) == pytest.approx((3 * 5 / 9 + 1) / 4)


@pytest.fixture(scope="module")
def tiny_pair():
    from transformers.utils import logging as hf_logging

    from bridge.calibrate import calibrate
    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    source, target = AgentModel("tiny-llama"), AgentModel("tiny-mistral")
    bridge = calibrate(source, target, num_queries=4, n_texts=4, progress=False)
    return source, target, bridge


def test_end_to_end_eval_produces_every_metric(tiny_pair, tmp_path):
    from bridge.data import generate, write_jsonl
    from latentwire.cli import main

    source, target, bridge = tiny_pair
    bridge.save(tmp_path / "b.safetensors")
    data = write_jsonl(generate(3, "val"), tmp_path / "val.jsonl")
    out = tmp_path / "eval.json"
    rc = main(["eval", "--data", str(data), "--modes", "latent,text,direct,none", "--bridge",
               str(tmp_path / "b.safetensors"), "--max-new-tokens", "4", "--message-tokens", "8",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and set(result["modes"]) == {"latent", "text", "direct", "none"}
    for mode, m in result["modes"].items():
        for key in ("em", "em_exact", "f1", "nll", "transfer_ratio", "diversity"):
            assert math.isfinite(m[key]), (mode, key)
        assert 0 <= m["em"] <= 1 and 0 < m["diversity"] <= 1
    assert result["modes"]["none"]["transfer_ratio"] == pytest.approx(0.0)
    assert result["modes"]["direct"]["transfer_ratio"] == pytest.approx(1.0)
    lat = result["modes"]["latent"]
    assert -1 <= lat["pairwise_cosine"] <= 1 and 0.5 < lat["rms_ratio"] < 2  # calibrated scale
    assert -1 <= lat["context_embedding_cosine"] <= 1
    golds = {it["answer"] for it in generate(3, "val")}
    assert result["gold_diversity"] == pytest.approx(len(golds) / 3)
    assert 0 < result["modes"]["text"]["message_tokens"] <= 8
    assert result["config"]["bridge_sha256"] == bridge.sha256
    assert len(result["items"]) == 3 and "message" in result["items"][0]


def test_latent_packet_is_the_serving_computation(tiny_pair):
    source, _, bridge = tiny_pair
    ctx, q = "Alice lives in Oslo.", "Which city does Alice live in?"
    soft = ev.soft_tokens(source, bridge, ctx, q, wire_dtype=None)
    ids, span = source.source_prompt(ctx, q)
    h = source.hidden_states(ids, bridge.cfg.source_layer)[span]
    with torch.no_grad():
        assert torch.equal(soft, bridge(h[None])[0])
    assert soft.shape == (4, bridge.cfg.d_tgt)


def test_nll_of_an_item_matches_a_plain_forward(tiny_pair):
    """Teacher-forced answer NLL equals a full-logits forward over target_inputs + answer."""
    from bridge.objective import answer_ids

    _, target, _ = tiny_pair
    q, a, ctx = "How old is Alice?", "42", "Alice is 42 years old."
    with torch.no_grad():
        prompt = target.target_inputs(ctx, q)
        ans = answer_ids(target, a)
        full = torch.cat([prompt, target.embed(ans[None])], 1)
        logits = target.model(inputs_embeds=full, attention_mask=torch.ones(1, full.shape[1], dtype=torch.long)).logits
        n = prompt.shape[1]
        ref = torch.nn.functional.cross_entropy(logits[0, n - 1 : n - 1 + len(ans)], ans).item()
    assert ev.item_nll(target, ctx, q, a) == pytest.approx(ref, rel=1e-4)


def test_calibrate_needs_an_output_path_and_leaves_the_packaged_bridge_alone(capsys):
    """An untrained bridge must never land on the packaged (trained) path by default."""
    from bridge.load import default_weights_path
    from latentwire.cli import main

    packaged = default_weights_path().read_bytes()
    with pytest.raises(SystemExit) as err:
        main(["bridge", "calibrate", "--source", "tiny-llama", "--target", "tiny-mistral"])
    assert err.value.code == 2 and "--out" in capsys.readouterr().err
    assert default_weights_path().read_bytes() == packaged
