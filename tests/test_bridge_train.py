"""Bridge training: the loss sees exactly the serving prompt, and the Ray Train job checkpoints,
recovers from a worker failure and resumes (tiny pair, real local Ray cluster, 2 CPU workers)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bridge.objective import answer_ids, answer_logits, build_batch



@pytest.fixture(scope="module")
def tiny():
    from transformers.utils import logging as hf_logging

    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    return AgentModel("tiny-llama"), AgentModel("tiny-mistral")


def test_training_batch_rows_are_the_serving_target_inputs(tiny):
    """Primer, template, BOS and question suffix identical to `target_inputs`; padding masked."""
    _, target = tiny
    soft = torch.randn(2, 4, target.hidden_size)
    payloads = [soft[0], "a short message", None, soft[1]]
    questions = ["Which city?", "How old is Alice today?", "Why?", "What colour is the car of Bob?"]
    answers = ["Oslo", "42", "because", "red"]
    b = build_batch(target, payloads, questions, answers)
    bos = target.embed(torch.tensor([[target.tok.bos_token_id]]))[0, 0]
    for i, (p, q, a) in enumerate(zip(payloads, questions, answers)):
        ref = target.target_inputs(p, q)[0]
        n = b.prompt_lens[i]
        assert n == ref.shape[0]
        assert torch.equal(b.embeds[i, :n], ref)
        assert torch.equal(b.embeds[i, 0], bos)  # BOS survives the inputs_embeds path
        k = len(answer_ids(target, a))
        assert b.attention_mask[i].sum() == n + k and b.attention_mask[i, : n + k].all()
        assert torch.equal(b.position_ids[i, : n + k], torch.arange(n + k))


def test_loss_logits_equal_the_first_generation_step(tiny):
    """The logits the loss reads at each row's last prompt position are those `generate` decodes
    from (unpadded, single item), despite right padding in a mixed-length batch."""
    _, target = tiny
    soft = torch.randn(3, 4, target.hidden_size)
    questions = ["Which city does Alice live in?", "Age?", "What is the name of Bob's pet, please?"]
    answers = ["Oslo", "4", "Rex"]
    b = build_batch(target, list(soft), questions, answers)
    with torch.no_grad():
        logits = answer_logits(target, b)
        first = [int((b.label_rows == i).nonzero()[0]) for i in range(3)]
        for i, q in enumerate(questions):
            emb = target.target_inputs(soft[i], q)
            n = emb.shape[1]
            ref = target.model(inputs_embeds=emb, attention_mask=torch.ones(1, n, dtype=torch.long),
                               position_ids=torch.arange(n)[None], logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(logits[first[i]], ref, rtol=1e-4, atol=1e-4)


def test_cached_source_states_equal_the_serving_hidden_states(tiny):
    from bridge.cache import batch, source_states
    from bridge.data import generate

    source, _ = tiny
    items = generate(5, "train")
    states = source_states(source, items, [1, 3], batch_size=3, progress=False)
    for layer in (1, 3):
        h, lengths = states[layer]
        hb, mask = batch(h, lengths, list(range(5)))
        for i, it in enumerate(items):
            ids, span = source.source_prompt(it["context"], it["question"])
            ref = source.hidden_states(ids, layer)[span]  # the context tokens: what a packet carries
            assert int(lengths[i]) == ref.shape[0] and mask[i].sum() == ref.shape[0]
            torch.testing.assert_close(hb[i, : ref.shape[0]], ref.float(), rtol=2e-3, atol=2e-3)  # fp16 cache


def test_anchor_targets_are_the_targets_own_answer_embeddings(tiny):
    from bridge.train import anchor_accuracy, anchor_loss, anchor_targets

    _, target = tiny
    items = [{"answer": "Oslo"}, {"answer": "1947"}]
    e, ids, m = anchor_targets(target, items, 6)
    for i, it in enumerate(items):
        a = answer_ids(target, it["answer"])
        assert m[i].sum() == min(6, len(a)) and torch.equal(ids[i, : len(a)], a[:6])
    rms = target.embed_rms()
    assert float(anchor_loss(e, e, m, rms)) == 0.0
    assert anchor_accuracy(target, e, ids, m) == 1.0  # a packet that spells the answer is read back as it
    noise = e + torch.randn_like(e) * 10 * rms
    assert float(anchor_loss(noise, e, m, rms)) > 1.0 and anchor_accuracy(target, noise, ids, m) < 1.0


def test_an_unknown_export_choice_is_refused():
    from bridge.train import TrainConfig

    with pytest.raises(ValueError, match="'best' or 'last'"):
        TrainConfig(export="newest")


def test_batch_order_is_a_function_of_the_step():
    from bridge.train import batch_indices

    a = [batch_indices(s, 40, 4, r, 2, seed=1) for s in range(12) for r in range(2)]
    assert a == [batch_indices(s, 40, 4, r, 2, seed=1) for s in range(12) for r in range(2)]
    epoch0 = sum(a[:10], [])  # 5 steps x 2 ranks x 4 = one epoch of 40 items, no repeats
    assert sorted(epoch0) == list(range(40))



def test_ray_train_job_checkpoints_recovers_and_resumes(ray_cluster, tmp_path):
    from bridge.perceiver import PerceiverBridge
    from bridge.train import TrainConfig, run
    from latentwire.weights import sha256_file

    cfg = TrainConfig(source="tiny-llama", target="tiny-mistral", num_queries=4, d_model=32, n_layers=1,
                      steps=4, batch_size=2, train_items=24, val_items=3, eval_every=2, checkpoint_every=2,
                      threads=1, num_workers=2, max_failures=1, fail_at_step=3, max_new_tokens=3,
                      anchor_steps=3, anchor_batch=4,
                      cache_dir=str(tmp_path / "cache"), storage_path=str(tmp_path / "ray"),
                      out=str(tmp_path / "final.safetensors"))
    first = run(cfg, progress=False)
    # a worker raised at step 3; FailureConfig restarted the group from the step-2 checkpoint
    assert first["steps"] == 4
    ckpt = Path(first["checkpoint"])
    man = json.loads((ckpt / "bridge.json").read_text())
    assert man["sha256"] == sha256_file(ckpt / "bridge.safetensors")
    assert man["metrics"]["step"] == 4 and "val_em" in man["metrics"] and "val_rms_ratio" in man["metrics"]
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 4
    final = PerceiverBridge.load(cfg.out)  # bf16 export, sha-checked on load
    assert final.cfg.num_queries == 4 and final.sha256
    # the export is the checkpoint with the lowest held-out NLL, and its manifest says which step
    best = min(first["history"], key=lambda m: m["val_nll"])
    assert first["exported_step"] == best["step"]
    assert json.loads(Path(cfg.out).with_suffix(".json").read_text())["metrics"]["step"] == best["step"]

    second = run(replace(cfg, steps=6, fail_at_step=None, resume=str(ckpt), out=None,
                         name="resumed"), progress=False)
    # the failed attempt's step-3 work was redone from the step-2 checkpoint; the resumed run went on
    # from step 4: every step was reported exactly once, in order
    assert [int(m["step"]) for m in first["history"]] == [2, 4]
    assert [int(m["step"]) for m in second["history"]] == [2, 4, 6]
    ckpt2 = Path(second["checkpoint"])
    assert json.loads((ckpt2 / "train_state.json").read_text())["step"] == 6
    a, b = PerceiverBridge.load(ckpt / "bridge.safetensors"), PerceiverBridge.load(ckpt2 / "bridge.safetensors")
    assert not torch.equal(a.resampler.queries, b.resampler.queries)  # it trained on
