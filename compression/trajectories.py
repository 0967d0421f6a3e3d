"""Trajectory collection for FMKVC: run the frozen model on offline text and record, per layer,

    K, V   (n_kv_heads, T, head_dim)  post-RoPE keys/values of every token (what the cache holds)
    Q      (n_q_heads,  P, head_dim)  post-RoPE queries at P "future" positions (second half of the text)
    F      (n_q_heads,  P, head_dim)  the force dL/dq at those queries
    G      (n_q_heads,  P, head_dim)  dL/do, the gradient of the loss w.r.t. the head's attention output

from one backward pass of the next-token loss over the second half of each text. F = J^T G where
J = do/dq, so F and G together let training match forces on the super-token cache (see losses.py).

Queries are captured by a registered attention function that makes each layer's query a leaf
tensor; nothing in the model is changed. Samples are written in shards (safetensors + manifest via
latentwire.weights, sha256-checked on read) plus a `manifest.json` listing them, and read back
one shard at a time, so training streams without loading the whole set.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

KIND = "fmkvc-trajectories"
CAPTURE = "fmkvc_capture"
_captured: dict[int, dict[str, torch.Tensor]] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q = query.detach().requires_grad_(True)  # dL/dq lands here; values of the forward are unchanged
    out, weights = sdpa_attention_forward(module, q, key, value, attention_mask, **kwargs)
    out.retain_grad()  # (B, T, H, D): dL/do per head
    _captured[module.layer_idx] = {"q": q, "o": out, "k": key.detach(), "v": value.detach()}
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    if CAPTURE not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def token_samples(tok, n: int, length: int, *, skip_paragraphs: int = 0, reverse: bool = False) -> list[torch.Tensor]:
    """n samples of `length` token ids from the offline corpus (reverse=True reads it from the end:
    held-out text for evaluation)."""
    from latentwire.textdata import offline_corpus

    paras = list(offline_corpus())
    if reverse:
        paras = paras[::-1]
    out, buf = [], []
    for para in paras[skip_paragraphs:]:
        buf.extend(tok(" " + para, add_special_tokens=False).input_ids)
        while len(buf) >= length:
            out.append(torch.tensor(buf[:length]))
            buf = buf[length:]
            if len(out) == n:
                return out
    return out


def collect_sample(model, ids: torch.Tensor, n_queries: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """One text -> tensors K, V (L, n_kv, T, D) fp16, Q, F, G (L, n_q, P, D) fp32, qpos (P,)."""
    t = ids.shape[-1]
    half = t // 2
    qpos = torch.tensor(sorted(rng.sample(range(half, t), n_queries)))
    _captured.clear()
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.enable_grad():
            ids = ids.to(model.device)
            out = model(input_ids=ids[None], use_cache=False, logits_to_keep=t - half + 1)
            logits = out.logits[0, :-1].float()  # predicts tokens half..t-1
            loss = torch.nn.functional.cross_entropy(logits, ids[half:])
            loss.backward()
    finally:
        model.set_attn_implementation(previous)
        model.zero_grad(set_to_none=True)
    layers = sorted(_captured)
    qpos_d = qpos.to(model.device)
    rec = {
        "K": torch.stack([_captured[i]["k"][0] for i in layers]).half(),
        "V": torch.stack([_captured[i]["v"][0] for i in layers]).half(),
        "Q": torch.stack([_captured[i]["q"][0][:, qpos_d] for i in layers]).detach().float(),
        "F": torch.stack([_captured[i]["q"].grad[0][:, qpos_d] for i in layers]).float(),
        "G": torch.stack([_captured[i]["o"].grad[0][qpos_d].transpose(0, 1) for i in layers]).float(),
        "qpos": qpos,
        "loss": loss.detach().reshape(1),
    }
    rec = {k: v.cpu() for k, v in rec.items()}
    _captured.clear()
    return rec


def model_info(model) -> dict:
    cfg = model.config.get_text_config(decoder=True)
    layers = model.model.layers
    attn = layers[0].self_attn
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    sliding = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    return {"n_layers": len(layers), "n_q_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
            "head_dim": attn.head_dim, "scaling": float(attn.scaling), "sliding_window": sliding}


def collect(model, tok, out_dir: str | Path, *, profile: str, n_samples: int = 48, length: int = 384,
            n_queries: int = 24, shard_size: int = 8, seed: int = 0, log=print) -> dict:
    """Collect n_samples trajectories into out_dir (shards + manifest.json)."""
    from latentwire import weights

    _register()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = token_samples(tok, n_samples, length)
    if len(samples) < n_samples:
        raise ValueError(f"offline corpus gave only {len(samples)} samples of {length} tokens")
    rng = random.Random(seed)
    info = model_info(model)
    shards, buf, losses, t0 = [], [], [], time.time()
    for i, ids in enumerate(samples):
        buf.append(collect_sample(model, ids, n_queries, rng))
        losses.append(float(buf[-1]["loss"]))
        if len(buf) == shard_size or i == len(samples) - 1:
            tensors = {k: torch.stack([b[k] for b in buf]) for k in buf[0]}
            name = f"shard_{len(shards):04d}"
            man = weights.save(out_dir / f"{name}.safetensors", tensors, kind=KIND,
                               config={"profile": profile, **info, "length": length, "n_queries": n_queries},
                               data={"corpus": "pydoc_data.topics", "samples": len(buf)})
            shards.append({"file": f"{name}.safetensors", "sha256": man["sha256"], "samples": len(buf)})
            buf = []
            log(f"collect {profile}: {i + 1}/{n_samples} samples, {time.time() - t0:.0f}s, "
                f"mean next-token loss {sum(losses) / len(losses):.3f}")
    manifest = {"kind": KIND, "profile": profile, **info, "length": length, "n_queries": n_queries,
                "samples": len(samples), "shards": shards, "mean_loss": sum(losses) / len(losses),
                "corpus": "pydoc_data.topics (start of corpus; evaluation reads from the end)"}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def iter_samples(data_dir: str | Path, *, shard_ids: list[int] | None = None, shuffle_seed: int | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Stream samples shard by shard (one shard in memory at a time), sha256-verified."""
    from latentwire import weights

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    order = shard_ids if shard_ids is not None else list(range(len(manifest["shards"])))
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        order = list(order)
        rng.shuffle(order)
    for si in order:
        tensors, _ = weights.load(data_dir / manifest["shards"][si]["file"], kind=KIND)
        idx = list(range(next(iter(tensors.values())).shape[0]))
        if shuffle_seed is not None:
            rng.shuffle(idx)
        for j in idx:
            yield {k: v[j] for k, v in tensors.items()}
