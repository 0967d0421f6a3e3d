"""`latentwire train sidecar`: a Ray Train TorchTrainer job that fits the FMKVC sidecar.

Each worker streams its own trajectory shards (the last shard is held out for evaluation), builds
batches of windows from every (layer, kv head) of a sample, and minimises the full-cache losses of
losses.py. Every `eval_every` steps it evaluates on the held-out shard for every window size (Jacobian
norm ratio, k/v norm ratios, attention entropy, output cosine, attention-mass ratio) and reports
through `ray.train.report`; every `checkpoint_every` steps rank 0 attaches a checkpoint
(sidecar.safetensors beside the `latentwire.jobs` checkpoint format). A restarted run (same name,
a worker failure under FailureConfig, or `--resume DIR`) continues from that checkpoint. The job,
force matching then (optionally) distillation, is registered as `sidecar` in
`latentwire.jobs.TRAIN_JOBS`, which launches it. Ray stays in this file and `latentwire.jobs`; the
model does not know about it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from latentwire.errors import ConfigError
from latentwire.jobs import (TRAIN_JOBS, TrainJob, job_config, launch, load_checkpoint, report,
                             restored_checkpoint, save_checkpoint)


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    data: str = ""
    windows: list[int] = field(default_factory=lambda: [4, 8, 16])
    sink: int = 4
    steps: int = 600
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 20
    batch_windows: int = 1024
    d_model: int = 128
    n_blocks: int = 2
    n_heads: int = 4
    jac_weight: float = 1.0
    force_weight: float = 1.0
    proportional: bool = True  # train (and serve) super-tokens with proportional attention
    value_norm: str = "fixed"  # sidecar's |v~|: "fixed" to the window mean norm, or "bounded" by it
    n_probes: int = 4
    # stage 2, end-to-end distillation through the frozen model (compression/distill.py); 0: off
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_window: int = 8
    recent: int = 64
    distill_context: int = 768
    distill_tokens: int = 64
    distill_docs: int = 48  # training texts; 2 more are held out for its evaluation
    # start from these sidecar weights (a packaged sidecar, to continue its training) instead of a
    # random init; with steps=0 the job only distills and needs no trajectories
    init_weights: str = ""
    eval_every: int = 50
    eval_samples: int = 4
    checkpoint_every: int = 100
    threads: int = 1
    seed: int = 0


# ---- batches --------------------------------------------------------------------------------
def make_batch(sample: dict, window: int, sink: int, info: dict, max_windows: int | None, rng: random.Random):
    """Rows = (layer, kv head) pairs; each row compresses windows [sink, end) before every query."""
    k = sample["K"].float()
    n_layers, n_kv, length, d = k.shape
    g = info["n_q_heads"] // n_kv
    qpos = sample["qpos"]
    m = (int(qpos.min()) - sink) // window
    end = sink + m * window
    rows = list(range(n_layers * n_kv))
    if max_windows is not None and len(rows) * m > max_windows:
        rows = sorted(rng.sample(rows, max(1, max_windows // m)))
    rows_t = torch.tensor(rows)

    def per_row(x):  # (L, Hq, P, D) -> (rows, g * P, D): a kv head's queries are its group's queries
        p = x.shape[2]
        return x.float().reshape(n_layers * n_kv, g * p, d)[rows_t]

    kk = k.reshape(n_layers * n_kv, length, d)[rows_t]
    vv = sample["V"].float().reshape(n_layers * n_kv, length, d)[rows_t]
    return {
        "k": kk, "v": vv, "q": per_row(sample["Q"]), "f": per_row(sample["F"]), "g": per_row(sample["G"]),
        "qpos": qpos.repeat(g), "slot": rows_t, "m": m, "end": end, "window": window,
    }


def batch_loss(sidecar, batch: dict, cfg: TrainConfig, scale: float, generator=None) -> dict:
    from compression.losses import fmkvc_loss

    device = next(sidecar.parameters()).device if isinstance(sidecar, torch.nn.Module) else torch.device("cpu")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n, w, m, d = batch["k"].shape[0], batch["window"], batch["m"], batch["k"].shape[-1]
    sink, end = cfg.sink, batch["end"]
    kw = batch["k"][:, sink:end].reshape(n * m, w, d)
    vw = batch["v"][:, sink:end].reshape(n * m, w, d)
    slot = batch["slot"].repeat_interleave(m)
    kt, vt = sidecar(kw, vw, slot)
    # the sidecar is trained as the cache serves it: proportional attention (log W) unless configured off
    log_mass = math.log(w) if getattr(getattr(sidecar, "cfg", None), "proportional", False) else 0.0
    return fmkvc_loss(batch["q"], batch["k"], batch["v"], batch["g"], batch["f"], kt.reshape(n, m, d),
                      vt.reshape(n, m, d), batch["qpos"], sink=sink, end=end, scale=scale, n_probes=cfg.n_probes,
                      jac_weight=cfg.jac_weight, force_weight=cfg.force_weight, log_mass=log_mass,
                      generator=generator)


@torch.no_grad()
def evaluate(sidecar, samples: list[dict], cfg: TrainConfig, info: dict) -> dict:
    """Held-out metrics per window size, for the sidecar and for plain mean pooling (reference)."""
    from compression.sidecar import mean_pool

    out: dict[str, float] = {}
    was_training = sidecar.training
    sidecar.eval()
    gen = torch.Generator().manual_seed(1234)
    for w in cfg.windows:
        acc: dict[str, list[float]] = {}
        for s in samples:
            b = make_batch(s, w, cfg.sink, info, None, random.Random(0))
            for name, fn in (("", sidecar), ("mean_pool_", lambda k, v, slot: mean_pool(k, v))):
                res = batch_loss(fn, b, cfg, info["scaling"], gen)
                for key, val in res.items():
                    acc.setdefault(f"{name}{key}", []).append(float(val))
        for key, vals in acc.items():
            out[f"w{w}/{key}"] = sum(vals) / len(vals)
    sidecar.train(was_training)
    return out


# ---- checkpoints ----------------------------------------------------------------------------
def _write_checkpoint(directory: Path, sidecar, opt, step: int, cfg: TrainConfig, metrics: dict) -> None:
    sidecar.save(directory / SidecarJob.exports, data={"trajectories": cfg.data, "step": step}, metrics=metrics)
    save_checkpoint(directory, step=step, config=asdict(cfg), metrics=metrics, optimizer=opt)


# ---- the Ray Train worker loop --------------------------------------------------------------
def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from compression.sidecar import Sidecar, SidecarConfig
    from compression.trajectories import iter_samples, read_manifest
    from latentwire import weights

    cfg = job_config(config, TrainConfig)
    torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    info, mine, val = None, [], []
    if cfg.steps > 0:  # force matching reads trajectories; distillation alone reads only text
        info = read_manifest(cfg.data)
        n_shards = len(info["shards"])
        val_shards = [n_shards - 1] if n_shards > 1 else [0]
        train_shards = [i for i in range(n_shards) if i not in val_shards or n_shards == 1]
        mine = train_shards[rank::world] or train_shards
        val = list(iter_samples(cfg.data, shard_ids=val_shards))[: cfg.eval_samples]

    if cfg.init_weights:  # the same file on every rank: identical initial weights
        sidecar = Sidecar.load(cfg.init_weights).train()  # sha-verified against its manifest
        if cfg.distill_steps and cfg.distill_window not in sidecar.cfg.windows:  # distillation teaches a new W
            sidecar.cfg.windows = sorted({*sidecar.cfg.windows, cfg.distill_window})
    else:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        sidecar = Sidecar(SidecarConfig(head_dim=info["head_dim"], n_layers=info["n_layers"],
                                        n_kv_heads=info["n_kv_heads"], d_model=cfg.d_model,
                                        n_blocks=cfg.n_blocks, n_heads=cfg.n_heads, windows=list(cfg.windows),
                                        max_window=max(32, max(cfg.windows)), model=cfg.model,
                                        proportional=cfg.proportional, value_norm=cfg.value_norm))
    opt = torch.optim.AdamW(sidecar.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = resumed_from = 0
    with restored_checkpoint(config["resume"]) as d:
        if d is not None:  # before .to(device): CPU tensors
            tensors, _ = weights.load(d / SidecarJob.exports, kind="fmkvc-sidecar")
            sidecar.load_state_dict(tensors)
            step = resumed_from = int(load_checkpoint(d, opt)["step"])
            print(f"[rank {rank}] resumed from step {step}")
    device = ray.train.torch.get_device()  # cuda:N with use_gpu, else cpu
    sidecar.to(device)
    for st in opt.state.values():  # restored optimizer state follows its parameters
        for key, tensor in st.items():
            if torch.is_tensor(tensor) and key != "step":
                st[key] = tensor.to(device)
    model = ray.train.torch.prepare_model(sidecar, move_to_device=False) if world > 1 else sidecar
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.05, 1 - s / max(cfg.steps, 1)))
    for _ in range(step):
        sched.step()
    rng = random.Random(cfg.seed * 1000 + rank * 7 + step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)

    def stream():
        epoch = 0
        while True:
            yield from iter_samples(cfg.data, shard_ids=mine, shuffle_seed=cfg.seed + 17 * epoch + rank + step)
            epoch += 1

    data = stream()
    t0, running = time.time(), {}
    total = cfg.steps + cfg.distill_steps

    def report_step(step: int, metrics: dict, do_ckpt: bool, optimizer) -> None:
        metrics = {"resumed_from": resumed_from, **metrics}
        report(metrics, partial(_write_checkpoint, sidecar=sidecar, opt=optimizer, step=step, cfg=cfg,
                                metrics=metrics) if do_ckpt and rank == 0 else None)

    while step < cfg.steps:
        batch = make_batch(next(data), rng.choice(cfg.windows), cfg.sink, info, cfg.batch_windows, rng)
        res = batch_loss(model, batch, cfg, info["scaling"], gen)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        for key in ("loss", "output", "jacobian", "force"):
            running[key] = 0.9 * running.get(key, float(res[key])) + 0.1 * float(res[key])
        last = step == cfg.steps  # the end of this stage: evaluated and saved before any distillation
        do_eval = step % cfg.eval_every == 0 or last
        do_ckpt = step % cfg.checkpoint_every == 0 or last
        if not (do_eval or do_ckpt):
            continue
        metrics = {"step": step, "elapsed_s": round(time.time() - t0, 1), **{f"train/{k}": v for k, v in running.items()}}
        if do_eval and rank == 0:  # the held-out evaluation is the same on every rank: run it once
            metrics.update(evaluate(sidecar, val, cfg, info))
        if rank == 0:
            print(f"[step {step}/{total} {metrics['elapsed_s']}s] loss {running['loss']:.4f} "
                  + " ".join(f"W{w}: cos {metrics.get(f'w{w}/output_cosine', float('nan')):.4f} "
                             f"jac {metrics.get(f'w{w}/jacobian', float('nan')):.3f}"
                             f" (mean-pool {metrics.get(f'w{w}/mean_pool_jacobian', float('nan')):.3f}) "
                             f"Jratio {metrics.get(f'w{w}/jacobian_norm_ratio', float('nan')):.3f}"
                             for w in cfg.windows), flush=True)
        report_step(step, metrics, do_ckpt, opt)
    if step < total:
        distill_loop(cfg, sidecar, opt, step, total, report_step, rank, world, device, t0)


def distill_loop(cfg: TrainConfig, sidecar, opt, step: int, total: int, report_step, rank: int, world: int,
                 device, t0: float) -> None:
    """Stage 2: KL(dense || compressed) through the frozen model; gradients averaged across workers by
    hand (the sidecar runs once per layer per step, which DDP's one-forward-per-backward rule forbids)."""
    import torch.distributed as dist

    from compression import attention
    from compression.cache import Schedule
    from compression.distill import distill_loss, documents
    from latentwire import profiles

    # bf16 on GPUs; fp32 on CPUs, where bf16 is slow (super-tokens and the KL are computed in fp32 anyway)
    host, tok = profiles.load(cfg.model, device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32")
    host.requires_grad_(False)
    attention.enable(host)
    length = cfg.distill_context + cfg.distill_tokens
    docs = [d.to(device) for d in documents(tok, cfg.distill_docs + 2, length)]
    train_docs, val_docs = docs[:-2], docs[-2:]
    if len(train_docs) < 1:
        raise ValueError(f"the offline corpus holds too little text for {length}-token distillation documents")
    schedule = Schedule(cfg.distill_window, cfg.sink, cfg.recent)
    dopt = torch.optim.AdamW(sidecar.parameters(), lr=cfg.distill_lr, weight_decay=cfg.weight_decay)
    if step > cfg.steps:  # resumed inside this stage: the checkpoint's optimizer state is this stage's
        dopt.load_state_dict(opt.state_dict())
        for group in dopt.param_groups:
            group["lr"] = cfg.distill_lr

    def held_out_kl() -> float:
        sidecar.eval()
        with torch.no_grad():
            kl = sum(float(distill_loss(host, sidecar, d, cfg.distill_context, schedule)) for d in val_docs)
        sidecar.train()
        return kl / len(val_docs)

    start_kl = held_out_kl() if rank == 0 else float("nan")  # where this stage starts from, for comparison
    running = None
    sidecar.train()
    while step < total:
        ids = train_docs[(step * world + rank) % len(train_docs)]
        kl = distill_loss(host, sidecar, ids, cfg.distill_context, schedule)
        dopt.zero_grad(set_to_none=True)
        kl.backward()
        if world > 1:
            for p in sidecar.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(sidecar.parameters(), 1.0)
        dopt.step()
        step += 1
        value = float(kl.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        last = step == total
        do_eval = step % cfg.eval_every == 0 or last
        do_ckpt = step % cfg.checkpoint_every == 0 or last
        if not (do_eval or do_ckpt):
            continue
        metrics = {"step": step, "elapsed_s": round(time.time() - t0, 1), "distill/kl": running,
                   "distill/val_kl_at_start": start_kl}
        if do_eval and rank == 0:
            metrics["distill/val_kl"] = held_out_kl()
            print(f"[distill step {step}/{total} {metrics['elapsed_s']}s] kl {running:.4f} held-out kl "
                  f"{metrics['distill/val_kl']:.4f} (at start {start_kl:.4f})", flush=True)
        report_step(step, metrics, do_ckpt, dopt)


def check_config(cfg: TrainConfig) -> dict | None:
    """Refuse a job that cannot run before any worker starts: force matching without trajectories,
    or initial weights that are not a sidecar of this model (read and sha-verified here).
    Returns the initial weights' manifest, if any."""
    from compression.sidecar import Sidecar
    from latentwire.weights import WeightsError

    if cfg.steps < 0 or cfg.distill_steps < 0 or cfg.steps + cfg.distill_steps == 0:
        raise ConfigError(f"nothing to train: steps={cfg.steps}, distill_steps={cfg.distill_steps}")
    if cfg.steps > 0 and not cfg.data:
        raise ConfigError("force matching (steps > 0) reads trajectories: give --data "
                             "(from `latentwire collect-trajectories`), or --steps 0 to only distill")
    if not cfg.init_weights:
        return None
    try:
        init = Sidecar.load(cfg.init_weights)
    except WeightsError as err:  # missing, or its sha differs from its manifest
        raise ConfigError(str(err)) from err
    if init.cfg.model != cfg.model:
        raise ConfigError(f"{cfg.init_weights} is a sidecar of {init.cfg.model!r}, not of {cfg.model!r}")
    if cfg.distill_steps and not 1 < cfg.distill_window <= init.cfg.max_window:
        # a window it was not trained for is learnt by the distillation; past max_window it has no positions
        raise ConfigError(f"{cfg.init_weights} embeds windows of 2..{init.cfg.max_window} tokens, "
                             f"not the distillation window {cfg.distill_window}")
    return init.manifest


def run(cfg: TrainConfig, *, num_workers: int = 1, use_gpu: bool = False, storage_path: str | None = None,
        name: str | None = None, out: str | None = None, max_failures: int = 2, resume: str | None = None) -> dict:
    """Start (or continue) the job on the local/attached Ray cluster; copy the final sidecar to `out`."""
    init = check_config(cfg)
    # workers run in their own directories: paths given relative to the caller's must not change meaning
    cfg = replace(cfg, data=str(Path(cfg.data).resolve()) if cfg.data else "",
                  init_weights=str(Path(cfg.init_weights).resolve()) if cfg.init_weights else "")
    from compression.sidecar import Sidecar, default_weights_path
    from latentwire import weights

    result = launch(SidecarJob, cfg, num_workers=num_workers, use_gpu=use_gpu, storage_path=storage_path,
                    resume=resume, max_failures=max_failures, name=name or f"fmkvc-{cfg.model}", threads=cfg.threads)
    with result.checkpoint.as_directory() as d:
        sidecar = Sidecar.load(Path(d) / SidecarJob.exports)  # sha-verified
        ckpt_manifest = sidecar.manifest
    out_path = Path(out) if out else default_weights_path(cfg.model)
    man = weights.save(out_path, sidecar.state_dict(), kind="fmkvc-sidecar", config=ckpt_manifest["config"],
                       data={**ckpt_manifest["data"], "trajectories": str(cfg.data), "train": asdict(cfg),
                             **({"init_sha256": init["sha256"]} if init else {})},
                       metrics=result.metrics)
    return {"weights": str(out_path), "sha256": man["sha256"], "checkpoint": result.checkpoint.path,
            "metrics": result.metrics}


@TRAIN_JOBS.register("sidecar")
class SidecarJob(TrainJob):
    """The FMKVC sidecar: force matching on trajectories, then end-to-end distillation (either may be 0 steps)."""

    config = TrainConfig
    exports = "sidecar.safetensors"
    keep_checkpoints = None  # every checkpoint stays: each ends a stage or a stretch of steps
    loop = staticmethod(train_loop)
    run = staticmethod(run)
