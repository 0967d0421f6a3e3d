"""FMKVC and mean pooling as kvpress presses: same cache as FMKVCCache, and inside kvpress's pipeline."""

import pytest
import torch
from transformers import DynamicCache, pipeline
from transformers.utils import logging as hf_logging

from compression.cache import FMKVCCache, Schedule
from compression.methods.fmkvc import sidecar_compressor
from compression.methods.mean_pool import mean_pool_compressor
from compression.evaluate import EvalConfig, make_method, prefill
from compression.presses import FMKVCPress, MeanPoolPress, nominal_budget
from compression.sidecar import Sidecar, SidecarConfig
from latentwire import profiles
from tests.conftest import tiny_gemma3

hf_logging.disable_progress_bar()
torch.set_num_threads(1)


def _ids(n, seed=0):
    return torch.randint(3, 600, (1, n), generator=torch.Generator().manual_seed(seed))


def test_press_and_cache_agree_in_prefill_and_decode():
    """Press path (DynamicCache, kvpress convention: cache length = stored entries, explicit positions)
    and cache path (true positions + mask offset) must give the same logits at every step."""
    model, _ = profiles.load("tiny-llama")
    ids = _ids(130)
    press = MeanPoolPress(window=8, sink=4, recent=16)
    cache_a, cache_b = DynamicCache(), FMKVCCache(model.config, Schedule(8, 4, 16), mean_pool_compressor)
    with torch.no_grad(), press(model):
        la = [model(ids[:, :100], past_key_values=cache_a, position_ids=torch.arange(100)[None]).logits[:, -1]]
        for t in range(100, 130):
            la.append(model(ids[:, t:t + 1], past_key_values=cache_a, position_ids=torch.tensor([[t]])).logits[:, -1])
            assert cache_a.get_seq_length() == Schedule(8, 4, 16).expected_length(t + 1)
    with torch.no_grad():
        lb = [model(ids[:, :100], past_key_values=cache_b).logits[:, -1]]
        for t in range(100, 130):
            lb.append(model(ids[:, t:t + 1], past_key_values=cache_b).logits[:, -1])
    torch.testing.assert_close(torch.cat(la), torch.cat(lb), atol=1e-5, rtol=1e-5)


def test_fmkvc_press_in_kvpress_pipeline(tmp_path):
    model, tok = profiles.load("tiny-llama")
    torch.manual_seed(0)
    sc = Sidecar(SidecarConfig(head_dim=16, n_layers=4, n_kv_heads=2, d_model=32, n_heads=2))
    sc.save(tmp_path / "sc.safetensors")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    context = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)
    cache = DynamicCache()
    out = pipe(context, question="What jumps?", press=FMKVCPress(window=4, sink=4, recent=16,
                                                                   weights=str(tmp_path / "sc.safetensors")),
               cache=cache, max_new_tokens=5)
    assert isinstance(out["answer"], str)
    n_ctx = len(pipe.preprocess(context, [""], "", 10**9)["context_ids"][0])
    assert cache.get_seq_length() == Schedule(4, 4, 16).expected_length(n_ctx) < n_ctx


def test_fmkvc_press_equals_cache_with_same_sidecar(tmp_path):
    model, _ = profiles.load("tiny-llama")
    torch.manual_seed(1)
    sc = Sidecar(SidecarConfig(head_dim=16, n_layers=4, n_kv_heads=2, d_model=32, n_heads=2))
    torch.nn.init.normal_(sc.delta_k.weight, std=0.5)  # not just mean pooling
    sc.save(tmp_path / "sc.safetensors")
    ids = _ids(120, seed=4)
    cache_a = DynamicCache()
    with torch.no_grad(), FMKVCPress(window=8, sink=4, recent=16, weights=str(tmp_path / "sc.safetensors"))(model):
        la = model(ids, past_key_values=cache_a, position_ids=torch.arange(120)[None]).logits[:, -1]
    with torch.no_grad():  # press closed (as in kvpress's pipeline while it decodes): super-tokens keep their mass
        la2 = model(ids[:, :1], past_key_values=cache_a, position_ids=torch.tensor([[120]])).logits[:, -1]
    cache_b = FMKVCCache(model.config, Schedule(8, 4, 16), sidecar_compressor(Sidecar.load(tmp_path / "sc.safetensors")))
    with torch.no_grad():
        lb = model(ids, past_key_values=cache_b).logits[:, -1]
        lb2 = model(ids[:, :1], past_key_values=cache_b).logits[:, -1]
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(la2, lb2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny-gemma3", "tiny-llama", "tiny-mistral"])
def test_expected_attention_baseline_compresses_every_layer(family):
    """eval-cache's expected_attention baseline (make_method + prefill, as the evaluator runs it): Gemma 3's
    rotary embedding needs each layer's type (kvpress called it without one: 'None_inv_freq')."""
    model = tiny_gemma3() if family == "tiny-gemma3" else profiles.load(family)[0]
    cfg, ratio, n = EvalConfig(sink=4, recent=16), 4, 120
    ids = torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(5))
    rope_types = []  # the layer types the press asks the shared rotary embedding for
    rotary = model.model.rotary_emb
    spy = rotary.register_forward_pre_hook(lambda m, a, kw: rope_types.append(kw.get("layer_type")) if kw else None,
                                           with_kwargs=True)
    try:
        cache, press = make_method("expected_attention", model, cfg, ratio, n)
        with torch.no_grad():
            logits = prefill(model, ids, cache, press)
    finally:
        spy.remove()
    budget = nominal_budget(n, ratio, cfg.sink, cfg.recent)
    assert budget < n
    assert [layer.keys.shape[-2] for layer in cache.layers] == [budget] * model.config.num_hidden_layers
    assert torch.isfinite(logits).all()
    if family == "tiny-gemma3":  # each layer's own type: sliding (local base) or full (global base)
        assert rope_types == list(model.config.layer_types)


def test_a_wider_window_layout_keeps_the_budget_and_spends_the_rest_on_recent_tokens():
    """eval-cache --window W: mean pooling (a window method) at W=32 holds no more entries after prefill
    than the 4x budget of W=4 every method gets, and keeps a longer recent window than --recent."""
    from compression.evaluate import window_layout

    model, _ = profiles.load("tiny-llama")
    cfg, ratio, n = EvalConfig(sink=4, recent=16, window=32), 4, 300
    assert window_layout(EvalConfig(sink=4, recent=16), ratio, n) == (4, 16)  # the default: W = ratio
    window, recent = window_layout(cfg, ratio, n)
    budget = nominal_budget(n, ratio, cfg.sink, cfg.recent)
    assert window == 32 and recent > cfg.recent
    assert nominal_budget(n, 32, cfg.sink, recent) <= budget < nominal_budget(n, 32, cfg.sink, recent + 32)
    cache, press = make_method("mean_pool", model, cfg, ratio, n)
    with torch.no_grad():
        prefill(model, _ids(n)[0], cache, press)
    entries = [layer.keys.shape[-2] for layer in cache.layers]
    assert entries == [nominal_budget(n, 32, cfg.sink, recent)] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="does not fit"):
        window_layout(EvalConfig(sink=4, recent=16, window=512), ratio, n)


def test_a_serving_cache_refuses_a_sidecar_that_differs_from_the_pinned_digest(tmp_path):
    from compression.cache import cache_factory
    from latentwire.weights import WeightsError

    model, _ = profiles.load("tiny-llama")
    sc = Sidecar(SidecarConfig(head_dim=16, n_layers=4, n_kv_heads=2, d_model=32, n_heads=2))
    digest = sc.save(tmp_path / "sc.safetensors")["sha256"]
    opts = dict(method="fmkvc", weights=str(tmp_path / "sc.safetensors"), window=4, sink=4, recent=16)
    assert cache_factory(model, **opts, weights_sha256=digest).layers  # the pinned bytes load
    with pytest.raises(WeightsError, match="pinned"):
        cache_factory(model, **opts, weights_sha256="0" * 64)


def test_eval_cache_runs_a_hybrid_keep_spec_at_the_budget_of_its_ratio(tmp_path):
    """`eval-cache --methods mean_pool:keep=1` through the CLI: windows of ratio x 2 tokens, each leaving one
    exact entry and one super-token, hold no more entries than the ratio's budget (and within one window of
    it), and bytes are those entries; the JSON is keyed by the spec and its goals handle hybrid specs."""
    import json

    from compression.base import Schedule
    from latentwire.cli import main

    out = tmp_path / "eval.json"
    n, ratio, sink, recent = 300, 4, 4, 16
    rc = main(["eval-cache", "--model", "tiny-llama", "--context", str(n), "--ratios", str(ratio), "--facts", "1",
               "--ppl-tokens", "8", "--decode-tokens", "3", "--sink", str(sink), "--recent", str(recent),
               "--methods", "dense,mean_pool,mean_pool:keep=1,mean_pool:keep=2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    budget = nominal_budget(n, ratio, sink, recent)
    dense = res["methods"]["dense"]["1"]
    plain = res["methods"]["mean_pool"][str(ratio)]
    assert plain["kv_entries_max_layer"] == budget
    for keep in (1, 2):
        hybrid = res["methods"][f"mean_pool:keep={keep}"][str(ratio)]
        window = ratio * (keep + 1)
        assert (hybrid["keep"], hybrid["window"]) == (keep, window) and hybrid["recent"] <= recent
        entries = hybrid["kv_entries_max_layer"]
        assert entries == Schedule(window, sink, hybrid["recent"], keep=keep).expected_length(n)
        assert budget - window < entries <= budget
        assert hybrid["kv_bytes"] == dense["kv_bytes"] * entries / n  # every layer holds those entries
        assert hybrid["kv_reduction"] >= plain["kv_reduction"] > 1
    # a pruning baseline has no windows to keep entries of: refused before the model loads
    assert main(["eval-cache", "--model", "tiny-llama", "--methods", "snapkv:keep=1", "--json", str(out)]) == 2
