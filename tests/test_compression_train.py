"""A tiny Ray Train sidecar job on 2 CPU workers: sha-verified checkpoint, resume, then distillation."""

import pytest
import torch
from transformers.utils import logging as hf_logging

from compression import trajectories as tj
from compression.train import TrainConfig, run
from latentwire import profiles, weights

hf_logging.disable_progress_bar()
torch.set_num_threads(1)



def test_two_worker_job_checkpoints_and_resumes(tmp_path, ray_cluster):
    model, tok = profiles.load("tiny-llama")
    data = tmp_path / "traj"
    tj.collect(model, tok, data, profile="tiny-llama", n_samples=6, length=64, n_queries=4, shard_size=2,
               log=lambda *_: None)
    cfg = TrainConfig(model="tiny-llama", data=str(data), windows=[4, 8], steps=2, batch_windows=64, d_model=32,
                      n_heads=2, eval_every=2, checkpoint_every=2, eval_samples=1)
    kw = dict(num_workers=2, storage_path=str(tmp_path / "ray"), name="sidecar-test", out=str(tmp_path / "sc"))
    first = run(cfg, **kw)
    assert first["metrics"]["step"] == 2 and first["metrics"]["resumed_from"] == 0
    assert 0 < first["metrics"]["w8/output_cosine"] <= 1
    assert abs(first["metrics"]["w8/k_norm_ratio"] - 1) < 1e-4  # hard normalisation, logged
    tensors, man = weights.load(tmp_path / "sc.safetensors", kind="fmkvc-sidecar")  # sha-verified
    assert man["sha256"] == first["sha256"] and man["config"]["n_kv_heads"] == 2
    assert man["config"]["proportional"] is True  # trained for proportional attention, as it will be served
    ckpt_tensors, _ = weights.load(f"{first['checkpoint']}/sidecar.safetensors", kind="fmkvc-sidecar")
    assert all(torch.equal(tensors[k], ckpt_tensors[k]) for k in tensors)

    cfg.steps = 4  # same run name: restarts from the step-2 checkpoint, not from scratch
    second = run(cfg, **kw)
    assert second["metrics"]["step"] == 4 and second["metrics"]["resumed_from"] == 2
    after, _ = weights.load(tmp_path / "sc.safetensors", kind="fmkvc-sidecar")
    assert any(not torch.equal(after[k], tensors[k]) for k in tensors)

    # stage 2 on top: end-to-end distillation through the frozen model, gradients averaged over 2 workers
    # 3 steps with checkpoint_every=2: the last step (7) must still be evaluated, saved and exported
    cfg.distill_steps, cfg.distill_context, cfg.distill_tokens, cfg.distill_window = 3, 48, 8, 4
    cfg.recent, cfg.distill_docs, cfg.distill_lr = 8, 4, 1e-3
    third = run(cfg, **kw)
    assert third["metrics"]["step"] == 7 and third["metrics"]["resumed_from"] == 4
    assert 0 <= third["metrics"]["distill/val_kl"] < 10 and third["metrics"]["distill/kl"] > 0
    distilled, man = weights.load(tmp_path / "sc.safetensors", kind="fmkvc-sidecar")
    assert man["data"]["step"] == 7
    assert any(not torch.equal(distilled[k], after[k]) for k in after)

    # distillation alone, continuing a trained sidecar: no trajectories, starts from its weights,
    # and teaches it a window force matching did not train (16; it was trained for 4 and 8)
    init = tmp_path / "sc.safetensors"
    cont = TrainConfig(model="tiny-llama", steps=0, distill_steps=2, init_weights=str(init), distill_context=48,
                       distill_tokens=8, distill_window=16, recent=8, distill_docs=4, distill_lr=1e-3,
                       eval_every=2, checkpoint_every=2)
    fourth = run(cont, **{**kw, "name": "sidecar-continue", "out": str(tmp_path / "cont")})
    assert fourth["metrics"]["step"] == 2 and fourth["metrics"]["resumed_from"] == 0
    cont_tensors, cont_man = weights.load(tmp_path / "cont.safetensors", kind="fmkvc-sidecar")
    assert cont_man["data"]["init_sha256"] == man["sha256"]
    assert cont_man["config"]["windows"] == [4, 8, 16]  # the distilled window joins the ones it serves
    assert any(not torch.equal(cont_tensors[k], distilled[k]) for k in distilled)
    # its held-out KL at the start is the one of the initial weights, not of a random init
    from compression import attention
    from compression.cache import Schedule
    from compression.distill import distill_loss, documents
    from compression.sidecar import Sidecar

    host, tok = profiles.load("tiny-llama")
    host.requires_grad_(False)
    attention.enable(host)
    val_docs = documents(tok, cont.distill_docs + 2, 56)[-2:]
    with torch.no_grad():
        start = sum(float(distill_loss(host, Sidecar.load(init), d, 48, Schedule(16, 4, 8))) for d in val_docs) / 2
    assert fourth["metrics"]["distill/val_kl_at_start"] == pytest.approx(start, rel=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"steps": 2, "data": ""}, "give --data"),
    ({"steps": 0, "distill_steps": 0}, "nothing to train"),
    ({"steps": 0, "distill_steps": 2, "init_weights": "WRONG_MODEL"}, "not of 'tiny-llama'"),
    ({"steps": 0, "distill_steps": 2, "distill_window": 64, "init_weights": "SC"}, "distillation window 64"),
])
def test_a_job_that_cannot_run_is_refused_before_it_starts(tmp_path, change, message):
    from compression.sidecar import Sidecar, SidecarConfig

    Sidecar(SidecarConfig(model="tiny-llama", windows=[4, 8], d_model=16, n_heads=2)).save(tmp_path / "sc.safetensors")
    Sidecar(SidecarConfig(model="tiny-mistral", d_model=16, n_heads=2)).save(tmp_path / "other.safetensors")
    paths = {"SC": str(tmp_path / "sc.safetensors"), "WRONG_MODEL": str(tmp_path / "other.safetensors")}
    change = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    cfg = TrainConfig(**{"model": "tiny-llama", **change})
    with pytest.raises(ValueError, match=message):
        run(cfg, storage_path=str(tmp_path / "ray"), out=str(tmp_path / "out"))
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "ray").exists()


def test_the_command_line_names_what_is_wrong_in_one_line(tmp_path, capsys):
    from latentwire.cli import main

    rc = main(["train", "sidecar", "--model", "tiny-llama", "--steps", "0", "--distill-steps", "2",
               "--init-weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "missing.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
