"""`latentwire eval-cache`: FMKVC against dense and kvpress baselines at equal memory.

For each nominal ratio r the window presses use W = r (plus `sink` and `recent` dense tokens) and the
pruning baselines from kvpress get the same number of cache entries after prefill
(compression_ratio = 1 - budget / context). Protocol, identical for every method (it mirrors
kvpress's pipeline: compress the context at prefill, then read the rest without pruning):

- perplexity: prefill `context` held-out tokens (compressed), then score the next `ppl_tokens`
  tokens in one forward pass with explicit positions;
- attention-output cosine to dense: every layer's attention output on those continuation tokens;
- fact recall: filler text with a fact ("The access code of the X vault is NNNN.") placed early, so
  it falls into compressed windows; prefill, read question + answer prefix, greedy-decode; exact match;
- KV cache bytes after prefill (what the cache object holds) and decode ms/token (greedy).

Text is pydoc_data read from the END of the corpus (trajectories are collected from its start).
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BASELINES = ("streamingllm", "snapkv", "knorm", "expected_attention")
WINDOW_METHODS = ("fmkvc", "mean_pool")


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    ratios: list[int] = field(default_factory=lambda: [4, 8, 16])
    context: int = 1024
    ppl_docs: int = 6
    ppl_tokens: int = 64
    facts: int = 12
    sink: int = 4
    recent: int = 64
    decode_tokens: int = 32
    methods: list[str] = field(default_factory=lambda: ["dense", "fmkvc", *BASELINES, "mean_pool"])
    weights: str | None = None
    seed: int = 0


# ---- methods ---------------------------------------------------------------------------------
def make_method(name: str, model, cfg: EvalConfig, ratio: int, n_context: int):
    """-> (fresh cache, press context manager factory or None)."""
    from transformers import DynamicCache

    from compression.cache import FMKVCCache, Schedule, make_compressor
    from compression.presses import nominal_budget

    if name == "dense":
        return DynamicCache(config=model.config), None
    if name in WINDOW_METHODS:
        comp = make_compressor(name, profile=cfg.model, weights=cfg.weights)
        return FMKVCCache(model.config, Schedule(ratio, cfg.sink, cfg.recent), comp), None
    import kvpress

    budget = nominal_budget(n_context, ratio, cfg.sink, cfg.recent)
    cr = 1.0 - budget / n_context
    press = {
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=cr, n_sink=cfg.sink),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=cr, window_size=min(64, cfg.recent)),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=cr),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=cr, n_sink=cfg.sink),
    }[name]()
    return DynamicCache(), press  # kvpress's pipeline default cache


def prefill(model, ids: torch.Tensor, cache, press) -> torch.Tensor:
    """Compressed prefill of the context; returns the last position's logits."""
    n = ids.shape[-1]
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids[None], past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(n)[None], logits_to_keep=1)
    return out.logits[0, -1]


def extend(model, ids: torch.Tensor, cache, start: int, logits_to_keep: int = 0):
    """Read more tokens (no pruning) at true positions start..start+len-1."""
    return model(input_ids=ids[None], past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(start, start + ids.shape[-1])[None], logits_to_keep=logits_to_keep).logits[0]


# ---- data ------------------------------------------------------------------------------------
NAMES = ["amber", "cobalt", "crimson", "ivory", "jade", "onyx", "scarlet", "silver", "topaz", "violet", "copper",
         "indigo", "saffron", "teal", "umber", "golden"]
PLACES = ["vault", "archive", "tower", "harbor", "garden", "library", "bridge", "station"]


def fact_items(tok, n: int, context: int, seed: int) -> list[dict]:
    from compression.trajectories import token_samples

    rng = random.Random(seed)
    filler = token_samples(tok, n, context, reverse=True, skip_paragraphs=400)
    items = []
    for i, fill in enumerate(filler):
        name, place, code = rng.choice(NAMES), rng.choice(PLACES), str(rng.randint(1000, 9999))
        fact = tok(f" The access code of the {name} {place} is {code}.", add_special_tokens=False).input_ids
        question = tok(f"\nQuestion: What is the access code of the {name} {place}?\nAnswer: The access code of "
                       f"the {name} {place} is", add_special_tokens=False).input_ids
        at = int(context * rng.uniform(0.1, 0.3))  # early: inside the compressed windows at every ratio
        ctx = torch.cat([fill[:at], torch.tensor(fact), fill[at:context - len(fact)]])
        items.append({"context": _with_bos(tok, ctx), "question": torch.tensor(question), "answer": code,
                      "fact_pos": at})
    return items


def _with_bos(tok, ids: torch.Tensor) -> torch.Tensor:
    if tok.bos_token_id is not None:
        return torch.cat([torch.tensor([tok.bos_token_id]), ids[:-1]])
    return ids


# ---- measurements ----------------------------------------------------------------------------
@torch.no_grad()
def attention_outputs(model, fn):
    """Run fn() while capturing every layer's attention output; returns (result, list of tensors)."""
    outs, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0].detach())))
    try:
        res = fn()
    finally:
        for h in hooks:
            h.remove()
    return res, outs


@torch.no_grad()
def eval_ppl(model, docs, name, cfg, ratio, dense_attn=None):
    from compression.cache import cache_nbytes

    nll, count, cos, nbytes, lengths = 0.0, 0, [], [], []
    attn_all = []
    for i, doc in enumerate(docs):
        ctx, cont = doc[: cfg.context], doc[cfg.context:]
        cache, press = make_method(name, model, cfg, ratio, len(ctx))
        last = prefill(model, ctx, cache, press)
        nbytes.append(cache_nbytes(cache))
        lengths.append(max(int(layer.keys.shape[-2]) for layer in cache.layers))
        logits, attn = attention_outputs(model, lambda: extend(model, cont[:-1], cache, len(ctx)))
        logits = torch.cat([last[None], logits], 0).float()
        nll += float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum"))
        count += len(cont)
        attn_all.append(attn)
        if dense_attn is not None:
            cos.extend(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
                       for a, b in zip(attn, dense_attn[i]))
    res = {"perplexity": float(torch.tensor(nll / count).exp()), "kv_bytes": statistics.mean(nbytes),
           "kv_entries_max_layer": statistics.mean(lengths)}
    if cos:
        res["attention_cosine"] = statistics.mean(cos)
    return res, attn_all


@torch.no_grad()
def eval_facts(model, tok, items, name, cfg, ratio, eos_ids):
    hits = []
    for it in items:
        cache, press = make_method(name, model, cfg, ratio, len(it["context"]))
        prefill(model, it["context"], cache, press)
        pos = len(it["context"])
        logits = extend(model, it["question"], cache, pos, logits_to_keep=1)
        pos += len(it["question"])
        ids = []
        for _ in range(6):
            nxt = int(logits[-1].argmax())
            if nxt in eos_ids:
                break
            ids.append(nxt)
            logits = extend(model, torch.tensor([nxt]), cache, pos, logits_to_keep=1)
            pos += 1
        text = tok.decode(ids, skip_special_tokens=True).strip()
        hits.append(text.startswith(it["answer"]))
    return {"fact_recall": sum(hits) / len(hits)}


@torch.no_grad()
def eval_decode(model, doc, name, cfg, ratio, n_tokens):
    cache, press = make_method(name, model, cfg, ratio, len(doc))
    logits = prefill(model, doc, cache, press)
    pos, nxt, times = len(doc), int(logits.argmax()), []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        logits = extend(model, torch.tensor([nxt]), cache, pos, logits_to_keep=1)
        times.append((time.perf_counter() - t0) * 1000)
        nxt, pos = int(logits[-1].argmax()), pos + 1
    times = times[2:]  # warm-up
    return {"decode_ms_per_token": statistics.median(times),
            "decode_ms_p95": sorted(times)[int(0.95 * (len(times) - 1))]}


def run(cfg: EvalConfig, json_out: str, plot_out: str | None = None, log=print) -> dict:
    from compression.trajectories import token_samples
    from latentwire import profiles
    from latentwire.runtime import AgentModel

    model, tok = profiles.load(cfg.model, dtype="float32")
    eos_ids = AgentModel(cfg.model, model=model, tokenizer=tok).eos_ids
    docs = [_with_bos(tok, d) for d in token_samples(tok, cfg.ppl_docs, cfg.context + cfg.ppl_tokens, reverse=True)]
    items = fact_items(tok, cfg.facts, cfg.context, cfg.seed)
    results: dict = {"config": asdict(cfg), "device": "cpu (shared 2-core, 1 torch thread, fp32)",
                     "nominal_budget": {}, "methods": {}}
    t_start = time.time()
    dense_res, dense_attn = eval_ppl(model, docs, "dense", cfg, 1)
    dense_res.update(eval_facts(model, tok, items, "dense", cfg, 1, eos_ids))
    dense_res.update(eval_decode(model, docs[0][: cfg.context], "dense", cfg, 1, cfg.decode_tokens))
    dense_res["attention_cosine"] = 1.0
    results["methods"]["dense"] = {"1": dense_res}
    log(f"dense: {json.dumps(dense_res)} ({time.time() - t_start:.0f}s)")
    from compression.presses import nominal_budget

    for ratio in cfg.ratios:
        results["nominal_budget"][str(ratio)] = nominal_budget(cfg.context, ratio, cfg.sink, cfg.recent)
        for name in cfg.methods:
            if name == "dense":
                continue
            t0 = time.time()
            res, _ = eval_ppl(model, docs, name, cfg, ratio, dense_attn)
            res.update(eval_facts(model, tok, items, name, cfg, ratio, eos_ids))
            res.update(eval_decode(model, docs[0][: cfg.context], name, cfg, ratio, cfg.decode_tokens))
            res["kv_reduction"] = dense_res["kv_bytes"] / res["kv_bytes"]
            res["perplexity_vs_dense"] = res["perplexity"] / dense_res["perplexity"]
            res["fact_recall_vs_dense"] = res["fact_recall"] / max(dense_res["fact_recall"], 1e-9)
            res["decode_vs_dense"] = res["decode_ms_per_token"] / dense_res["decode_ms_per_token"]
            results["methods"].setdefault(name, {})[str(ratio)] = res
            log(f"{name} x{ratio}: ppl {res['perplexity']:.3f} ({res['perplexity_vs_dense']:.3f}x dense) "
                f"recall {res['fact_recall']:.2f} cos {res['attention_cosine']:.4f} "
                f"kv/{res['kv_reduction']:.2f} decode {res['decode_ms_per_token']:.1f}ms ({time.time() - t0:.0f}s)")
    results["goals_8x"] = goals(results, 8)
    results["elapsed_s"] = round(time.time() - t_start, 1)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=2))
    if plot_out:
        plot(results, plot_out)
    return results


def goals(results: dict, ratio: int) -> dict:
    m = results["methods"]
    r = str(ratio)
    if "fmkvc" not in m or r not in m["fmkvc"]:
        return {}
    f, d = m["fmkvc"][r], m["dense"]["1"]
    others = {k: v[r] for k, v in m.items() if k not in ("dense", "fmkvc") and r in v}
    return {
        "perplexity_within_5pct_of_dense": f["perplexity"] <= 1.05 * d["perplexity"],
        "perplexity_better_than_every_baseline": all(f["perplexity"] < o["perplexity"] for o in others.values()),
        "fact_recall_at_least_80pct_of_dense": f["fact_recall"] >= 0.8 * d["fact_recall"],
        "fact_recall_above_streamingllm_and_mean_pool": all(
            f["fact_recall"] > others[k]["fact_recall"] for k in ("streamingllm", "mean_pool") if k in others),
        "kv_reduction": f["kv_reduction"],
        "decode_not_slower_than_dense": f["decode_ms_per_token"] <= d["decode_ms_per_token"],
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["methods"]
    ratios = results["config"]["ratios"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    metrics = [("perplexity", "perplexity (lower is better)"), ("fact_recall", "fact recall (EM)"),
               ("attention_cosine", "attention-output cosine to dense"), ("decode_ms_per_token", "decode ms/token")]
    for ax, (key, title) in zip(axes, metrics):
        for name, per in m.items():
            if name == "dense":
                ax.axhline(per["1"][key], color="black", ls="--", label="dense")
                continue
            xs = [r for r in ratios if str(r) in per]
            ax.plot(xs, [per[str(r)][key] for r in xs], marker="o", label=name, lw=2.5 if name == "fmkvc" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r}x" for r in ratios])
        ax.set_title(title)
        ax.set_xlabel("nominal KV ratio")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{results['config']['model']}: {results['config']['context']}-token context, CPU fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
