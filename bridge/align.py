"""`latentwire train bridge --arch aligned`: fit the aligned bridge (bridge.aligned) as a Ray Train job.

The fit is ridge regression, so the job is a distributed pass over the data rather than SGD:
each `TorchTrainer` worker runs the frozen source over its share of the work units and sums the
moments  S = sum [x, 1][x, 1]^T  and  B = sum [x, 1] y^T  of (source layer-L state x, target
embedding y) rows; the chunk's sums are all-reduced and rank 0 reports them as a checkpoint, so a
restarted job (FailureConfig) or `--resume` continues after the last whole chunk and ends with
the same sums. Rank 0 then solves for the normaliser and the linear map, evaluates on held-out
items and reports the bridge as the final checkpoint. The job is registered as `bridge-aligned` in
`latentwire.jobs.TRAIN_JOBS`, which launches it and owns the checkpoint format.

Rows (x at a source token, y = what the target should read there):
- y is the target's own embedding of the same piece of text when the target has that piece as one
  token (names split differently by the two tokenizers then still arrive piece by piece), else the
  overlap-weighted mean of the target tokens covering its characters (`aligned_rows`);
- units: fact items (context tokens only: what a packet carries), offline text chunks (lexical
  breadth) and random source-vocabulary sequences (every source token once in a while, so a name
  never seen in any text still has a row).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from latentwire.errors import ConfigError
from latentwire.jobs import (TRAIN_JOBS, TrainJob, is_restart, job_config, launch, load_checkpoint, report,
                             restored_checkpoint, save_checkpoint)


@dataclass
class AlignConfig:
    source: str = "smollm2-135m"
    target: str = "gemma3-270m"
    layer: int | None = None  # None: the source profile's source_layer
    train_items: int = 400
    wide_vocab: float = 0.7  # share of training entities from the wide pool (bridge.data)
    corpus_chunks: int = 300  # offline text chunks of >= 600 characters
    vocab_sequences: int = 100  # random source-vocabulary sequences of 256 tokens
    ridge: float = 1.0  # L2 weight, per 1000 rows
    temperature: float = 0.01
    chunk_units: int = 200  # work units per checkpoint
    val_items: int = 32
    seed: int = 0
    threads: int = 1
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 3
    storage_path: str | None = None  # None: latentwire.jobs.DEFAULT_STORAGE_PATH
    name: str | None = None
    resume: str | None = None
    out: str | None = None
    log_json: str | None = None
    fail_at_chunk: int | None = None  # test hook: raise once in this chunk (1-based) to exercise FailureConfig
    lexicon_slack: float | None = 4.0  # fit_lexicon's margin past the nearest row, in softmax units; None: no lexicon

    def __post_init__(self):
        if self.temperature <= 0 or self.ridge < 0:
            raise ConfigError("temperature must be > 0 and ridge >= 0")


# ---- rows -----------------------------------------------------------------------------------
def piece_targets(source, target, text: str, char_span: tuple[int, int] | None = None):
    """Source ids of `text`, the positions in `char_span` (default: all) with a target, and for
    each the target token id (single-token piece, else -1) and target vector (scaled embedding)."""
    s = source.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    t = target.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        temb = target.embed(torch.tensor(t.input_ids, dtype=torch.long, device=target.device)[None])[0].float()
    c0, c1 = char_span or (0, len(text))
    pos, tids, ys = [], [], []
    for i, (a, b) in enumerate(s.offset_mapping):
        if b <= a or b <= c0 or a >= c1:
            continue
        g = target.tok(text[a:b], add_special_tokens=False).input_ids
        if len(g) == 1:
            with torch.no_grad():
                y = target.embed(torch.tensor([[g[0]]], device=target.device))[0, 0].float()
            pos.append(i), tids.append(g[0]), ys.append(y)
            continue
        w = [(j, min(b, d) - max(a, c)) for j, (c, d) in enumerate(t.offset_mapping) if min(b, d) > max(a, c)]
        if w:
            tot = sum(o for _, o in w)
            pos.append(i), tids.append(-1), ys.append(sum(temb[j] * (o / tot) for j, o in w))
    ids = torch.tensor(s.input_ids, dtype=torch.long, device=source.device)
    y = torch.stack(ys) if ys else temb.new_zeros(0, target.hidden_size)
    return ids, torch.tensor(pos, dtype=torch.long), torch.tensor(tids, dtype=torch.long), y


@torch.no_grad()
def unit_rows(source, target, unit: tuple, layer: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, d_src), y (n, d_tgt)) rows of one work unit ("item", item) | ("text", str) | ("vocab", k)."""
    kind, payload = unit
    if kind == "vocab":
        g = torch.Generator().manual_seed(seed * 100_003 + payload)
        ids = torch.randint(0, min(len(source.tok), source.embed.num_embeddings), (256,), generator=g)
        xs, ys = [], []
        h = source.hidden_states(ids.to(source.device), layer).float()
        for i, t in enumerate(ids.tolist()):
            tg = target.tok(source.tok.decode([t]), add_special_tokens=False).input_ids
            if len(tg) == 1:
                xs.append(h[i]), ys.append(target.embed(torch.tensor([[tg[0]]], device=target.device))[0, 0].float())
        if not xs:
            return h.new_zeros(0, h.shape[-1]), h.new_zeros(0, target.hidden_size)
        return torch.stack(xs), torch.stack(ys)
    text, span = source.source_text(payload["context"], payload["question"]) if kind == "item" else (payload, None)
    ids, pos, _, y = piece_targets(source, target, text, span)
    h = source.hidden_states(ids, layer).float()
    return h[pos.to(h.device)], y


def work_units(cfg: AlignConfig) -> list[tuple]:
    """Every unit of the fit in a seeded order (so shards and resumption are reproducible)."""
    from bridge.data import generate
    from latentwire.textdata import text_chunks

    units = [("item", it) for it in generate(cfg.train_items, "train", seed=cfg.seed, wide=cfg.wide_vocab)]
    units += [("text", t) for t in text_chunks(cfg.corpus_chunks, min_chars=600)]
    units += [("vocab", k) for k in range(cfg.vocab_sequences)]
    random.Random(cfg.seed).shuffle(units)
    return units


def moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.cat([x.double(), x.new_ones(len(x), 1).double()], 1)
    return xt.T @ xt, xt.T @ y.double()


def solve(S: torch.Tensor, B: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """Normaliser (mean, log std) and linear map from the moments, ridge in normalised space."""
    d = S.shape[0] - 1
    n = S[d, d]
    mean = S[:d, d] / n
    var = (torch.diagonal(S)[:d] / n - mean**2).clamp_min(1e-10)
    std = var.sqrt()
    # z = (x - mean) / std: [z, 1] = [x, 1] M
    M = torch.zeros_like(S)
    M[:d, :d] = torch.diag(1 / std)
    M[d, :d] = -mean / std
    M[d, d] = 1
    Sz, Bz = M.T @ S @ M, M.T @ B
    reg = ridge * float(n) / 1000 * torch.eye(d + 1, dtype=S.dtype)
    reg[d, d] = 0  # the bias is not shrunk
    A = torch.linalg.solve(Sz + reg, Bz)  # (d+1, d_tgt)
    return {"normalizer.mean": mean.float(), "normalizer.log_std": std.log().float(),
            "proj.weight": A[:d].T.float().contiguous(), "proj.bias": A[d].float()}


def one_token_images(source, target) -> torch.Tensor:
    """For each source token id, the target token that is the same piece of text (-1: the target
    spells that piece with more than one token)."""
    images = torch.full((len(source.tok),), -1, dtype=torch.long)
    for t in range(len(source.tok)):
        g = target.tok(source.tok.decode([t]), add_special_tokens=False).input_ids
        if len(g) == 1:
            images[t] = g[0]
    return images


def candidate_vocab(source, target) -> torch.Tensor:
    """Target ids the projection may mix: the one-token images of the source vocabulary's pieces."""
    images = one_token_images(source, target)
    return torch.unique(images[images >= 0])


def build_bridge(source, target, cfg: AlignConfig, layer: int, params: dict, vocab_ids: torch.Tensor):
    from bridge.aligned import AlignedBridge, AlignedConfig

    acfg = AlignedConfig(source.name, target.name, layer, source.hidden_size, target.hidden_size,
                         temperature=cfg.temperature, embed_rms=target.embed_rms(),
                         embed_scale=float(getattr(target.embed, "embed_scale", 1.0)))
    bridge = AlignedBridge.from_embeddings(acfg, vocab_ids, target.embed.weight.detach())
    bridge.load_state_dict({**params, "vocab_ids": vocab_ids}, strict=True)
    return bridge.eval()


@torch.no_grad()
def evaluate(bridge, source, target, items: list[dict], answers: bool = True) -> dict:
    """Held-out: how many answer tokens land nearest their own target token, and EM of the answers."""
    from bridge.eval import exact_match, soft_tokens

    hit = tot = 0
    em, peaks = [], []
    for it in items:
        text, (c0, _) = source.source_text(it["context"], it["question"])
        a0 = c0 + it["context"].find(it["answer"])
        ids, pos, tids, _ = piece_targets(source, target, text, (a0, a0 + len(it["answer"])))
        x = bridge.mapped(source.hidden_states(ids, bridge.cfg.source_layer)[pos])
        nearest = bridge.vocab_ids[bridge.nearest(x, 1)[1][:, 0]]
        known = tids >= 0
        hit += int((nearest[known] == tids[known]).sum())
        tot += int(known.sum())
        peaks.append(bridge.project(x)[1].mean())
        if answers:
            soft = soft_tokens(source, bridge, it["context"], it["question"])
            em.append(exact_match(target.answer(soft, it["question"], 16).text, it["answer"]))
    out = {"val_answer_token_acc": hit / max(1, tot), "val_peak_weight": float(torch.stack(peaks).mean())}
    if em:
        out["val_em"] = sum(em) / len(em)
    return out


# ---- the lexicon: a prior for the tokens the map sends elsewhere ------------------------------
LEXICON_PREFIXES = ("The name is", "It was kept in", "Notes: the")  # contexts the margins are fitted in
HELD_OUT_PREFIX = "Yesterday, said"  # and the one they are checked in


def own_rows(bridge, source, target) -> torch.Tensor:
    """For each source token id, the position in `bridge.vocab` of the target token that is the same
    piece of text (-1: none; `candidate_vocab` holds every such token)."""
    pos = {int(v): i for i, v in enumerate(bridge.vocab_ids.tolist())}
    return torch.tensor([pos.get(int(g), -1) for g in one_token_images(source, target)], dtype=torch.long)


@torch.no_grad()
def token_states(bridge, source, tokens: torch.Tensor, prefix: str, batch: int = 4096) -> torch.Tensor:
    """The map's output for each of `tokens` right after `prefix` (layer-L states, rounded for the wire)."""
    from latentwire.codec import wire

    p = source.tokenize(prefix)
    out = []
    for t in tokens.split(batch):
        ids = torch.cat([p[None].expand(len(t), -1), t[:, None].to(p.device)], 1)
        h = source.hidden_states_batch(ids, torch.ones_like(ids), bridge.cfg.source_layer)[:, -1].float()
        out.append(bridge.mapped(wire(h, "bfloat16")))
    return torch.cat(out)


def own_gap(bridge, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """How much farther (squared distance) each row's own vocabulary row is than its nearest (0: it is the nearest)."""
    d2, idx = bridge.nearest(x, 1)
    gap = ((x - bridge.vocab[own]).pow(2).sum(-1) - d2[:, 0]).clamp_min(0)
    return gap.masked_fill(idx[:, 0] == own, 0)  # not rounding noise where it is the nearest


@torch.no_grad()
def fit_lexicon(bridge, source, target, slack: float = 4.0) -> dict:
    """Give the bridge a prior (`AlignedBridge.set_lexicon`) for every source token whose mapped state
    lands nearer another row than its own in any of LEXICON_PREFIXES: the largest such gap plus
    `slack` softmax units (temperature x d x rms^2, so its own row then weighs e^slack times more).
    Returns the held-out share of tokens whose soft token is nearest their own row, before and after."""
    own = own_rows(bridge, source, target)
    tokens = (own >= 0).nonzero()[:, 0]
    gap = torch.stack([own_gap(bridge, token_states(bridge, source, tokens, p), own[tokens])
                       for p in LEXICON_PREFIXES]).max(0).values
    unit = bridge.softmax_scale
    x = token_states(bridge, source, tokens, HELD_OUT_PREFIX)
    before = bridge.nearest(bridge.project(x)[0], 1)[1][:, 0] == own[tokens]
    fix = gap > 0
    bridge.set_lexicon(tokens[fix], own[tokens][fix], gap[fix] + slack * unit)
    after = bridge.nearest(bridge.project(x, tokens)[0], 1)[1][:, 0] == own[tokens]
    return {"lexicon_tokens": int(fix.sum()), "tokens_with_own_row": len(tokens),
            "held_out_own_row_before": float(before.float().mean()), "held_out_own_row_after": float(after.float().mean())}


# ---- the worker loop ------------------------------------------------------------------------
def _write_state(d: Path, chunks: int, S: torch.Tensor, B: torch.Tensor, rows: int, config: dict,
                 metrics: dict, bridge=None, job: str | None = None) -> None:
    """A checkpoint: the moments after `chunks` chunks (and, at the end, the fitted bridge)."""
    if bridge is not None:
        bridge.save(d / AlignJob.exports, data={"rows": rows, "job": job}, metrics=metrics)
    save_checkpoint(d, step=chunks, config=config, metrics=metrics, tensors={"moments": {"S": S, "B": B}},
                    data={"rows": rows})


def fit_loop(config: dict) -> None:
    """Runs on each Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from bridge.data import generate
    from latentwire.runtime import AgentModel

    hf_logging.disable_progress_bar()
    cfg = job_config(config, AlignConfig)
    torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu"
    source, target = AgentModel(cfg.source, device=device), AgentModel(cfg.target, device=device)
    layer = cfg.layer or source.profile.source_layer
    units = work_units(cfg)
    chunks = [units[i:i + cfg.chunk_units] for i in range(0, len(units), cfg.chunk_units)]
    d = source.hidden_size + 1
    S, B, rows, done = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, target.hidden_size,
                                                                             dtype=torch.float64), 0, 0
    restarted = is_restart()
    with restored_checkpoint(config["resume"]) as cd:
        if cd is not None:
            state = load_checkpoint(cd)
            done, rows = int(state["step"]), int(state["data"]["rows"])
            S, B = state["tensors"]["moments"]["S"], state["tensors"]["moments"]["B"]
    resumed = cd is not None
    t0 = time.time()
    config_out = {**asdict(cfg), "layer": layer}
    for c in range(done, len(chunks)):
        if cfg.fail_at_chunk == c + 1 and not (restarted or resumed) and rank == 0:
            raise RuntimeError(f"injected failure in chunk {c + 1} (test hook)")
        mine = chunks[c][rank::world]
        s_c, b_c, n_c = torch.zeros_like(S), torch.zeros_like(B), torch.zeros((), dtype=torch.float64)
        for unit in mine:
            x, y = unit_rows(source, target, unit, layer, cfg.seed)
            if len(x):
                ms, mb = moments(x, y)
                s_c += ms
                b_c += mb
                n_c += len(x)
        if world > 1:
            for t in (s_c, b_c, n_c):
                dist.all_reduce(t)
        S, B, rows = S + s_c, B + b_c, rows + int(n_c)
        metrics = {"chunk": c + 1, "chunks": len(chunks), "rows": rows, "seconds": round(time.time() - t0, 1)}
        if rank == 0:
            print(json.dumps(metrics))
        report(metrics, partial(_write_state, chunks=c + 1, S=S, B=B, rows=rows, config=config_out, metrics=metrics)
               if rank == 0 else None)
    if rank != 0:  # every worker reports each round (a report is collective); rank 0 alone solves
        report({"chunk": len(chunks), "chunks": len(chunks), "rows": rows})
        return
    bridge = build_bridge(source, target, cfg, layer, solve(S, B, cfg.ridge), candidate_vocab(source, target))
    lexicon = {} if cfg.lexicon_slack is None else fit_lexicon(bridge, source, target, cfg.lexicon_slack)
    metrics = {"chunk": len(chunks), "chunks": len(chunks), "rows": rows, "seconds": round(time.time() - t0, 1),
               **lexicon, **evaluate(bridge, source, target, generate(cfg.val_items, "val", seed=cfg.seed + 1))}
    print(json.dumps(metrics))
    report(metrics, partial(_write_state, chunks=len(chunks), S=S, B=B, rows=rows, config=config_out,
                            metrics=metrics, bridge=bridge, job=ctx.get_experiment_name()))


# ---- the job --------------------------------------------------------------------------------
def run(cfg: AlignConfig) -> dict:
    from bridge.aligned import AlignedConfig
    from latentwire import weights

    t_start = time.time()
    name = cfg.name or f"bridge-aligned-{cfg.source}-{cfg.target}-{int(t_start)}"
    result = launch(AlignJob, cfg, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, storage_path=cfg.storage_path,
                    resume=cfg.resume, max_failures=cfg.max_failures, name=name, threads=cfg.threads)
    with result.checkpoint.as_directory() as d:  # sha-checked; the export needs no embedding rows
        tensors, man = weights.load(Path(d) / AlignJob.exports, kind="bridge")
    acfg = AlignedConfig(**man["config"])
    summary = {"name": name, "arch": "aligned", "layer": acfg.source_layer, "bridge_id": acfg.bridge_id,
               "total_seconds": round(time.time() - t_start, 1), "checkpoint": result.checkpoint.path,
               "final_metrics": man["metrics"]}
    if cfg.out:
        data = {"train": "bridge.align work units", "items": cfg.train_items, "corpus_chunks": cfg.corpus_chunks,
                "vocab_sequences": cfg.vocab_sequences, "seed": cfg.seed, "job": name, "rows": man["data"].get("rows")}
        out = weights.save(cfg.out, tensors, kind="bridge", config=man["config"], data=data,
                           metrics={**man["metrics"], "train_seconds": summary["total_seconds"]})
        summary["out"], summary["sha256"] = str(cfg.out), out["sha256"]
    if cfg.log_json:
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.log_json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


@TRAIN_JOBS.register("bridge-aligned")
class AlignJob(TrainJob):
    """The aligned bridge's ridge fit: a distributed pass summing moments, then one solve."""

    config = AlignConfig
    exports = "bridge.safetensors"
    loop = staticmethod(fit_loop)
    run = staticmethod(run)
