"""Model profiles: all six exist; the tiny twins keep the production pair's structure."""

import pytest
import torch

from latentwire import profiles


def test_all_six_profiles_are_defined():
    assert set(profiles.PROFILES) == {"llama-3.1-8b", "mistral-7b-v0.3", "smollm2-135m", "gemma3-270m",
                                      "tiny-llama", "tiny-mistral"}
    assert profiles.get_profile("llama-3.1-8b").hf_id == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(KeyError, match="known"):
        profiles.get_profile("gpt-9")


def test_tiny_twins_mirror_the_production_families(tiny_source, tiny_target):
    src, tgt = tiny_source.model.config, tiny_target.model.config
    assert (src.model_type, tgt.model_type) == ("llama", "mistral")
    assert src.num_key_value_heads < src.num_attention_heads  # GQA like Llama-3.1 / Mistral
    assert src.rope_parameters["rope_theta"] == 500000.0 and tgt.rope_parameters["rope_theta"] == 1000000.0
    assert src.vocab_size != tgt.vocab_size and src.hidden_size != tgt.hidden_size
    assert tgt.sliding_window == 256


def test_tiny_load_is_deterministic():
    a, _ = profiles.load("tiny-llama")
    b, tok = profiles.load("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tok.decode(tok("The def statement", add_special_tokens=False).input_ids) == "The def statement"


def test_production_profile_loads_from_a_local_path(tmp_path, tiny_source):
    """Production profiles take `local_path`; exercised with a tiny model saved like a hub checkpoint."""
    tiny_source.model.save_pretrained(tmp_path)
    tiny_source.tok.save_pretrained(tmp_path)
    model, tok = profiles.load("llama-3.1-8b", dtype="float32", local_path=str(tmp_path))
    assert model.config.hidden_size == tiny_source.hidden_size and model.dtype == torch.float32
    assert tok.chat_template == tiny_source.tok.chat_template
