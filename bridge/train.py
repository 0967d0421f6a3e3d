"""`latentwire train bridge`: train the bridge as a Ray Train `TorchTrainer` job.

Driver (no Ray inside the models): generate train/val fact items (bridge.data), run the frozen
source once to cache its layer-L states (bridge.cache), calibrate the initial bridge
(bridge.calibrate, normaliser re-fitted on the cached prompts), then start the trainer.

Worker loop: the target model is frozen. Phase A (from scratch only, `anchor_steps`, bridge-only and
cheap: no target forward) teaches the bridge to put the target's own embeddings of the answer
tokens at its first soft positions; the LM loss alone found a constant prefix instead (pairwise
cosine 0.9998, EM 0 after 30 steps: posterior collapse, see results/bridge/sweep.json). Phase B
maps cached source states through the bridge (DDP across workers) and minimises the target's NLL of
the answer tokens given [primer] + soft tokens + [question] (bridge.objective: the serving
`target_inputs` per row, logits only at the answer positions), plus terms from the design's
failure list:
- anchor (weight `anchor_weight`): phase A's loss kept on, so the entity stays in the packet
  (entity scrambling) while the LM loss shapes the rest;
- diversity: the mean pairwise cosine between items' mean soft tokens (the collapse metric) above
  `div_margin`, so items cannot share one prefix that the target ignores (posterior/mode collapse);
- RMS: (log soft-token RMS / target embedding RMS)^2, so the learned output scale cannot drift
  away from the target's embedding magnitude.
Every `eval_every` steps rank 0 generates answers on a held-out subset (EM, diversity, pairwise
cosine, RMS ratio, LATENT-vs-NONE gap); every `checkpoint_every` steps it writes a checkpoint
(bridge.safetensors beside the `latentwire.jobs` checkpoint format) reported via `ray.train.report`.
Restarts (FailureConfig) and `--resume` continue from the checkpoint's step with the same data order;
every report carries `resumed_from`, the step its attempt started at (0: from scratch), and the
summary lists `started_at_steps`, one per attempt.
The exported bridge is the checkpoint with the lowest held-out answer NLL (`export="last"`: the final one).
The job is registered as `bridge-perceiver` in `latentwire.jobs.TRAIN_JOBS`, which launches it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from latentwire.errors import ConfigError
from latentwire.jobs import (TRAIN_JOBS, TrainJob, is_restart, job_config, launch, load_checkpoint, report,
                             restored_checkpoint, save_checkpoint)


@dataclass
class TrainConfig:
    source: str = "smollm2-135m"
    target: str = "gemma3-270m"
    layer: int | None = None  # None: the source profile's source_layer
    num_queries: int = 16
    d_model: int = 256
    n_layers: int = 2
    steps: int = 600
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    div_weight: float = 1.0
    div_margin: float = 0.8
    rms_weight: float = 0.1
    anchor_steps: int = 800  # phase A: bridge-only answer anchoring on cached states (no target forward)
    anchor_batch: int = 32
    anchor_weight: float = 0.5  # phase B: weight of the anchor term beside the LM loss
    train_items: int = 2400
    wide_vocab: float = 0.0  # share of training entities from the wide pool (bridge.data.wide_vocabulary)
    val_items: int = 32  # periodic eval subset (validation split: held-out templates and vocabulary)
    eval_every: int = 100
    checkpoint_every: int = 100
    max_new_tokens: int = 8
    seed: int = 0
    threads: int = 2  # torch threads per worker
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 2
    export: str = "best"  # "best": the checkpoint with the lowest held-out answer NLL; "last": the final one
    cache_dir: str = str(Path.home() / ".cache" / "latentwire" / "bridge-train")
    storage_path: str | None = None  # None: latentwire.jobs.DEFAULT_STORAGE_PATH
    name: str | None = None
    resume: str | None = None
    out: str | None = None
    log_json: str | None = None
    fail_at_step: int | None = None  # test hook: raise once at this step to exercise FailureConfig

    def __post_init__(self):
        if self.export not in ("best", "last"):
            raise ConfigError(f"export must be 'best' or 'last', got {self.export!r}")


# ---- driver-side preparation (source model, cached states, initial bridge) ------------------
def prepare(cfg: TrainConfig, layers: list[int] | None = None, progress: bool = True) -> dict:
    """Items + cached source states (for each of `layers`) + calibrated initial bridge; idempotent."""
    from bridge import cache
    from bridge.calibrate import calibrate
    from bridge.data import generate, write_jsonl
    from latentwire import profiles
    from latentwire.runtime import AgentModel

    layer = cfg.layer or profiles.get_profile(cfg.source).source_layer
    layers = sorted(set((layers or []) + [layer]))
    train = generate(cfg.train_items, "train", cfg.seed, wide=cfg.wide_vocab)
    val = generate(cfg.val_items, "val", cfg.seed)
    key = f"{cfg.source}__{cfg.target}__n{cfg.train_items}_v{cfg.val_items}_s{cfg.seed}_{cache.items_digest(train + val)}"
    root = Path(cfg.cache_dir) / key
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(val, root / "val.jsonl")
    paths = {s: {lay: root / f"{s}_L{lay}.safetensors" for lay in layers} for s in ("train", "val")}
    missing = [lay for lay in layers if not (paths["train"][lay].exists() and paths["val"][lay].exists())]
    source = None
    if missing:
        source = AgentModel(cfg.source)
        for split, items in (("train", train), ("val", val)):
            states = cache.source_states(source, items, missing, progress=progress)
            for lay, (h, lengths) in states.items():
                cache.save_states(paths[split][lay], h, lengths, source=cfg.source, layer=lay, items=items)
    init = root / f"init_L{layer}_K{cfg.num_queries}_d{cfg.d_model}x{cfg.n_layers}.safetensors"
    if not init.exists():
        source = source or AgentModel(cfg.source)
        target = AgentModel(cfg.target)
        # Normaliser fitted on the prompts the bridge will read (chat template + facts), real tokens only.
        h, lengths, _ = cache.load_states(paths["train"][layer])
        real = h[torch.arange(h.shape[1])[None] < lengths[:, None]]
        bridge = calibrate(source, target, layer=layer, num_queries=cfg.num_queries, n_texts=16, seed=cfg.seed,
                           progress=progress, source_states=real, d_model=cfg.d_model, n_layers=cfg.n_layers)
        bridge.save(init, data={"init": "calibrate(source_states=cached train prompts)"},
                    metrics={"target_embed_rms": target.embed_rms()})
    return {"root": str(root), "layer": layer, "init": str(init),
            "train_states": str(paths["train"][layer]), "val_states": str(paths["val"][layer]),
            "train_items": str(root / "train.jsonl"), "val_items": str(root / "val.jsonl")}


# ---- the worker loop ------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, n: int, per_worker: int, rank: int, world: int, seed: int) -> list[int]:
    """The items of one worker at one global step: a pure function of (step, seed), so a resumed
    run sees exactly the data order it would have seen without the interruption."""
    per_step = per_worker * world
    steps_per_epoch = max(1, n // per_step)
    epoch, within = divmod(step, steps_per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    start = within * per_step + rank * per_worker
    return order[start : start + per_worker]


def aux_losses(soft: torch.Tensor, target_rms: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean pairwise cosine of the items' mean soft tokens: the collapse metric itself; RMS term)."""
    z = F.normalize(soft.mean(1), dim=-1)
    b = z.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=z.device)
    cos = (z @ z.T)[off].mean() if b > 1 else soft.new_zeros(())
    rms = soft.pow(2).mean(-1).sqrt().mean()
    return cos, torch.log(rms / target_rms) ** 2


@torch.no_grad()
def anchor_targets(target, items: list[dict], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target embeddings of each item's answer tokens at soft positions 0..n-1: (N,K,d), ids, mask."""
    from bridge.objective import answer_ids

    e = torch.zeros(len(items), k, target.hidden_size, device=target.device)
    ids = torch.zeros(len(items), k, dtype=torch.long, device=target.device)
    mask = torch.zeros(len(items), k, device=target.device)
    for i, it in enumerate(items):
        a = answer_ids(target, it["answer"])[:k]
        e[i, : len(a)], ids[i, : len(a)], mask[i, : len(a)] = target.embed(a[None])[0].float(), a, 1
    return e, ids, mask


def anchor_loss(soft: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, target_rms: float) -> torch.Tensor:
    """Squared distance (in units of the target embedding RMS) between the first soft tokens and the
    target's own embeddings of the answer: the entity must be *in* the packet, in a form the target
    reads, which the LM loss alone (a constant prefix already lowers it) does not force."""
    d = (soft - e).pow(2).mean(-1) / target_rms**2
    return (d * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def anchor_accuracy(target, soft: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of answer positions whose soft token's nearest target embedding is the answer token."""
    w = target.embed.weight.float() * float(getattr(target.embed, "embed_scale", 1.0))
    s = soft[mask.bool()]
    dist = s.pow(2).sum(-1, keepdim=True) - 2 * s @ w.T + w.pow(2).sum(-1)[None]
    return float((dist.argmin(-1) == ids[mask.bool()]).float().mean())


@torch.no_grad()
def periodic_eval(bridge, target, h, lengths, items, cfg: TrainConfig, none_nll: float | None) -> dict:
    """Generation-based metrics on the held-out subset: what loss alone would hide."""
    from bridge import cache
    from bridge.eval import diversity, exact_match
    from bridge.eval import soft_token_stats
    from bridge.objective import answer_nll, build_batch

    bridge.eval()
    idx = list(range(len(items)))
    hb, mask = cache.batch(h, lengths, idx)
    soft = bridge(hb.to(target.device), mask.to(target.device))
    preds = [target.answer(soft[i], it["question"], cfg.max_new_tokens).text for i, it in enumerate(items)]
    qs, ans = [it["question"] for it in items], [it["answer"] for it in items]
    nll = float(answer_nll(target, build_batch(target, list(soft), qs, ans))[0])
    out = {"val_em": sum(exact_match(p, it["answer"]) for p, it in zip(preds, items)) / len(items),
           "val_diversity": diversity(preds), "val_nll": nll,
           **{f"val_{k}": v for k, v in soft_token_stats(soft, target.embed_rms()).items()}}
    if none_nll is not None:
        out["val_nll_none"] = none_nll
        out["val_nll_gap"] = none_nll - nll  # > 0: the soft tokens carry information
    e, ids, m = anchor_targets(target, items, soft.shape[1])
    out["val_anchor_acc"] = anchor_accuracy(target, soft, ids, m)
    out["val_examples"] = [f"{it['answer']} -> {p}" for it, p in list(zip(items, preds))[:4]]
    bridge.train()
    return out


def anchor_phase(model, h, lengths, e, m, cfg: TrainConfig, rank: int, world: int, target_rms: float,
                 device) -> None:
    """Phase A: bridge-only steps on the anchor loss (cheap: no target forward), from scratch only."""
    from bridge import cache

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.time()
    for step in range(cfg.anchor_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        idx = batch_indices(step, len(lengths), cfg.anchor_batch, rank, world, cfg.seed + 1)
        hb, mask = cache.batch(h, lengths, idx)
        soft = model(hb.to(device), mask.to(device))
        cos, rms_term = aux_losses(soft, target_rms)
        loss = (anchor_loss(soft, e[idx], m[idx], target_rms) + cfg.div_weight * F.relu(cos - cfg.div_margin)
                + cfg.rms_weight * rms_term)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if rank == 0 and (step + 1) % max(1, cfg.anchor_steps // 5) == 0:
            print(json.dumps({"anchor_step": step + 1, "anchor_loss": round(float(loss), 4),
                              "seconds": round(time.time() - t0, 1)}))


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm
    from transformers.utils import logging as hf_logging

    from bridge import cache
    from bridge.data import read_jsonl
    from bridge.eval import exact_match
    from bridge.perceiver import PerceiverBridge
    from bridge.objective import answer_nll, build_batch
    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    paths = config["paths"]
    cfg = job_config(config, TrainConfig)
    torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)

    target = AgentModel(cfg.target, device=str(device), dtype="float32")
    for p in target.model.parameters():
        p.requires_grad_(False)
    target_rms = target.embed_rms()
    h, lengths, _ = cache.load_states(Path(paths["train_states"]))
    items = read_jsonl(paths["train_items"])
    bridge = PerceiverBridge.load(paths["init"]).to(device).train()
    opt = torch.optim.AdamW(bridge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    start, history = 0, []  # history: every report of this run and the runs it continues
    restarted = is_restart()  # after a failure: Ray hands back the latest reported checkpoint
    with restored_checkpoint(config["resume"]) as d:
        if d is not None:
            bridge.load_state_dict(PerceiverBridge.load(d / PerceiverJob.exports).state_dict())
            state = load_checkpoint(d, opt)
            start, history = int(state["step"]), state["history"]
    model = ray.train.torch.prepare_model(bridge)  # DDP when world > 1
    anc_e, anc_ids, anc_m = anchor_targets(target, items, bridge.cfg.num_queries)
    if start == 0 and cfg.anchor_steps > 0:
        anchor_phase(model, h, lengths, anc_e, anc_m, cfg, rank, world, target_rms, device)

    val = vh = vl = None
    none_nll = None
    if rank == 0:
        val = read_jsonl(paths["val_items"])
        vh, vl, _ = cache.load_states(Path(paths["val_states"]))
        with torch.no_grad():
            none_nll = float(answer_nll(target, build_batch(target, [None] * len(val), [v["question"] for v in val],
                                                            [v["answer"] for v in val]))[0])
            none_em = sum(exact_match(target.answer(None, v["question"], cfg.max_new_tokens).text, v["answer"])
                          for v in val) / len(val)

    # Ray's tqdm: a plain tqdm's carriage returns never reach the driver's log from a worker.
    desc = f"train bridge L{paths['layer']} K{cfg.num_queries}"
    bar = tqdm(total=cfg.steps, desc=desc) if rank == 0 else None
    if bar is not None:
        bar.update(start)
    run_loss, run_n, t0 = 0.0, 0, time.time()
    data_info = {"train": paths["train_items"], "val": paths["val_items"], "train_items": len(items),
                 "generator": "bridge.data.generate (seeded; split by template and vocabulary)"}
    for step in range(start, cfg.steps):
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and not restarted and rank == 0:
            raise RuntimeError(f"injected failure at step {step} (test hook)")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = batch_indices(step, len(items), cfg.batch_size, rank, world, cfg.seed)
        hb, mask = cache.batch(h, lengths, idx)
        soft = model(hb.to(device), mask.to(device))
        tb = build_batch(target, list(soft), [items[i]["question"] for i in idx], [items[i]["answer"] for i in idx])
        nll, _ = answer_nll(target, tb)
        cos, rms_term = aux_losses(soft, target_rms)
        cos_val = cos.item()
        anc = anchor_loss(soft, anc_e[idx], anc_m[idx], target_rms)
        loss = (nll + cfg.div_weight * F.relu(cos - cfg.div_margin) + cfg.rms_weight * rms_term
                + cfg.anchor_weight * anc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        run_loss, run_n = run_loss + float(nll), run_n + 1
        if bar is not None:
            bar.update(1)
            bar.set_description(f"{desc} nll={float(nll):.3f} cos={cos_val:.2f} |g|={gnorm:.2f}")
        done = step + 1
        do_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
        do_eval = done % cfg.eval_every == 0 or do_ckpt  # every checkpoint carries its held-out scores
        if not (do_eval or do_ckpt):
            continue
        metrics = {"step": done, "resumed_from": start, "train_nll": run_loss / run_n, "lr": lr_at(step, cfg), "grad_norm": gnorm,
                   "train_pairwise_cosine": cos_val, "train_anchor": float(anc), "seconds_per_step": (time.time() - t0) / run_n}
        run_loss, run_n, t0 = 0.0, 0, time.time()
        history.append(metrics)  # the same dict: eval metrics below land in it too
        if rank == 0 and do_eval:
            metrics.update(periodic_eval(bridge, target, vh, vl, val, cfg, none_nll))
            metrics["val_em_none"] = none_em
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
        write = None
        if do_ckpt and rank == 0:
            plain = [{k: v for k, v in m.items() if k != "val_examples"} for m in history]
            write = partial(_write_checkpoint, bridge=bridge, opt=opt, step=done, metrics=plain[-1], history=plain,
                            config={**asdict(cfg), "layer": paths["layer"]}, data=data_info)
        report(metrics, write)
    if bar is not None:
        bar.close()


def _write_checkpoint(d: Path, bridge, opt, step: int, config: dict, metrics: dict, data: dict,
                      history: list[dict]) -> None:
    bridge.save(d / PerceiverJob.exports, data=data, metrics={**metrics, "step": step})
    save_checkpoint(d, step=step, config=config, metrics=metrics, optimizer=opt, data=data, history=history)


# ---- the job --------------------------------------------------------------------------------
def run(cfg: TrainConfig, progress: bool = True) -> dict:
    """Prepare data on the driver, run the TorchTrainer, export the final bridge to `cfg.out`."""
    from bridge.perceiver import PerceiverBridge

    t_start = time.time()
    paths = prepare(cfg, progress=progress)
    t_prep = time.time() - t_start
    name = cfg.name or f"bridge-{cfg.source}-{cfg.target}-L{paths['layer']}-K{cfg.num_queries}-{int(t_start)}"
    result = launch(PerceiverJob, cfg, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                    storage_path=cfg.storage_path, resume=cfg.resume, max_failures=cfg.max_failures, name=name,
                    threads=cfg.threads, inputs={"paths": paths})
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    # The held-out NLL rises and falls while the LR is high (32 items, unseen vocabulary); "best"
    # exports the checkpoint where it was lowest rather than whichever came last.
    best = result.get_best_checkpoint(PerceiverJob.score, "min") if cfg.export == "best" else None
    exported = best or result.checkpoint
    with exported.as_directory() as d:
        bridge = PerceiverBridge.load(Path(d) / PerceiverJob.exports)
        exported_state = load_checkpoint(d)
    summary = {"name": name, "layer": paths["layer"], "num_queries": cfg.num_queries, "steps": state["step"],
               "prepare_seconds": round(t_prep, 1), "total_seconds": round(time.time() - t_start, 1),
               "checkpoint": result.checkpoint.path, "final_metrics": state["metrics"],
               "exported_checkpoint": exported.path, "exported_step": exported_state["step"],
               "exported_metrics": exported_state["metrics"], "history": state.get("history", []),
               # the step each attempt of the job started at (0: from scratch; more: a restart or
               # --resume that loaded the checkpoint of that step), in order
               "started_at_steps": sorted({int(m.get("resumed_from", 0)) for m in state.get("history", [])}),
               "resumed_from": int(state["metrics"].get("resumed_from", 0))}
    if cfg.out:
        man = bridge.save(cfg.out, data={"train": "bridge.data.generate train split", "items": cfg.train_items,
                                         "seed": cfg.seed, "job": name},
                          metrics={**exported_state["metrics"], "step": exported_state["step"],
                                   "steps_run": state["step"], "train_seconds": summary["total_seconds"]},
                          dtype=torch.bfloat16)
        summary["out"], summary["sha256"] = str(cfg.out), man["sha256"]
    if cfg.log_json:
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.log_json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


@TRAIN_JOBS.register("bridge-perceiver")
class PerceiverJob(TrainJob):
    """The Perceiver bridge trained by SGD on the target's answer loss; exports the checkpoint with
    the lowest held-out answer NLL (or the last)."""

    config = TrainConfig
    exports = "bridge.safetensors"
    score = "val_nll"  # Ray keeps the latest checkpoint too (for restarts); the best one is exported
    loop = staticmethod(train_loop)
    run = staticmethod(run)
