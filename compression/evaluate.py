"""`latentwire eval-cache`: FMKVC against dense and kvpress baselines at equal memory.

For each nominal ratio r the window presses use W = r (plus `sink` and `recent` dense tokens) and the
pruning baselines from kvpress get the same number of cache entries after prefill
(compression_ratio = 1 - budget / context). A window method given as "NAME:keep=K" (`compression.base.
method_spec`) is the hybrid memory: windows of W = r (K + 1) tokens, each leaving its K most important
entries exact and one super-token, so it stores what NAME stores at r (its recent window is shortened
where the remainder of the longer windows would otherwise take it over the budget). With `window` set, the window presses instead use that W
at every ratio and spend the rest of the same budget on the longest recent window that fits
(`window_layout`): fewer, coarser super-tokens for the old text, more dense tokens for the new. Protocol, identical for every method (it mirrors
kvpress's pipeline: compress the context at prefill, then read the rest without pruning):

- each item: `context` held-out tokens with a fact ("The access code of the X vault is NNNN.") placed
  at 10-30% of it, so it falls into compressed windows at every ratio; prefill (compressed);
- perplexity: score the next `ppl_tokens` held-out tokens in one forward pass (explicit positions);
- attention-output cosine to dense: every layer's attention output on those continuation tokens;
- fact recall: then read question + answer prefix and greedy-decode; exact match on the code;
- KV cache bytes after prefill (what the cache object holds); decode ms/token: item 0 keeps
  decoding `decode_tokens` more tokens (median per step; optionally also after `timing_context`).

Text is pydoc_data read from the END of the corpus (trajectories are collected from its start).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BASELINES = ("streamingllm", "snapkv", "knorm", "expected_attention")  # the kvpress presses FMKVC is held against
# --methods names that are a registered method with options set (kept so earlier commands still run):
# fmkvc_refine is fmkvc with its super-tokens refitted on the context's own tail (compression/refine.py)
ALIASES = {"fmkvc_refine": ("fmkvc", lambda cfg: {"refine_steps": cfg.refine_steps, "refine_lr": cfg.refine_lr})}


def method_names() -> list[str]:
    """What --methods accepts: every registered method (compression.methods) and the aliases."""
    from compression.methods import COMPRESSORS

    return sorted([*COMPRESSORS.names(), *ALIASES])


def resolve(spec: str, cfg: "EvalConfig", **context):
    """The method a --methods spec ("NAME" or "NAME:keep=K") stands for, built with eval-cache's
    options; `context` (profile, weights, tokenizer) goes to the methods that take it. keep=K is the
    schedule's (`window_layout`), not the method's."""
    from compression.base import method_spec
    from compression.methods import build

    name, layout = method_spec(spec)
    keep = layout.get("keep", 0)
    base, options = ALIASES.get(name, (name, lambda cfg: {}))
    method = build(base, context=context, **options(cfg))
    if keep and not (method.compresses() and method.serves()):
        raise ValueError(f"method {spec!r}: keep=K is an option of the window methods (fmkvc, mean_pool, ...), "
                         f"not of {name!r}")
    return method


def check_spec(spec: str) -> bool:
    """Whether --methods may name `spec`: False for an unknown method, ValueError for a keep=K a method
    cannot take; nothing is loaded."""
    from compression.base import method_spec

    if method_spec(spec)[0] not in method_names():
        return False
    resolve(spec, EvalConfig())
    return True


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    ratios: list[int] = field(default_factory=lambda: [4, 8, 16])
    context: int = 1024
    ppl_tokens: int = 64
    facts: int = 10  # items (each: fact recall + perplexity of its continuation)
    sink: int = 4
    recent: int = 64
    decode_tokens: int = 32
    methods: list[str] = field(default_factory=lambda: ["dense", "fmkvc", *BASELINES, "mean_pool"])
    weights: str | None = None
    seed: int = 0
    timing_context: int = 0  # >0: also time decoding after a context this long (dense vs timing_methods)
    timing_methods: list[str] = field(default_factory=lambda: ["fmkvc"])
    timing_ratio: int = 8
    window: int = 0  # >0: window presses use this W at every ratio, recent filled up to the budget
    refine_steps: int = 30  # fmkvc_refine: optimiser steps per context (plain fmkvc: none)
    refine_lr: float = 3e-4


# ---- methods ---------------------------------------------------------------------------------
def window_layout(cfg: EvalConfig, ratio: int, n_context: int, keep: int = 0) -> tuple[int, int]:
    """(W, recent) of the window presses at `ratio` with `keep` exact entries per window: W = ratio x
    (keep + 1) and cfg.recent, or with cfg.window set, that W; either way the recent window is the
    longest (up to cfg.recent without cfg.window) whose entries after n_context tokens stay within the
    budget of (W = ratio, cfg.recent), the budget every method gets. Plain windows at W = ratio are that
    budget by definition; longer windows leave a longer dense remainder before the recent tokens, which
    a shorter recent window pays for."""
    from compression.base import Schedule
    from compression.presses import nominal_budget

    if ratio == 1 or (not cfg.window and not keep):
        return ratio, cfg.recent
    window = cfg.window or ratio * (keep + 1)
    budget = nominal_budget(n_context, ratio, cfg.sink, cfg.recent)
    longest = n_context if cfg.window else cfg.recent
    fits = [r for r in range(1, longest + 1)
            if Schedule(window, cfg.sink, r, keep=keep).expected_length(n_context) <= budget]
    if not fits:
        raise ValueError(f"W={window} (keep={keep}) does not fit the {ratio}x budget of {budget} entries")
    return window, max(fits)


def make_method(name: str, model, cfg: EvalConfig, ratio: int, n_context: int, tokenizer=None):
    """-> (fresh cache, press context manager factory or None) for the --methods name `name`."""
    from transformers import DynamicCache

    from compression.base import Schedule, method_spec
    from compression.cache import new_cache, reconstruction, sliding_layer_schedule
    from compression.presses import nominal_budget

    method = resolve(name, cfg, profile=cfg.model, weights=cfg.weights, tokenizer=tokenizer)
    if not method.compresses():  # the ceiling: transformers' own cache
        return DynamicCache(config=model.config), None
    if method.serves():  # a window method: the serving cache (switches the model to proportional attention if needed)
        layout = method_spec(name)[1]
        keep = layout.get("keep", 0)
        window, recent = window_layout(cfg, ratio, n_context, keep)
        schedule = Schedule(window, cfg.sink, recent, keep=keep)
        return new_cache(model, method, schedule, sliding_layer_schedule(schedule, layout.get("sliding_layers", "pool")),
                         reconstruction(layout.get("select", "window"), tokenizer)), None
    budget = nominal_budget(n_context, ratio, cfg.sink, cfg.recent)
    return DynamicCache(), method.press(1.0 - budget / n_context, Schedule(ratio, cfg.sink, cfg.recent))


def prefill(model, ids: torch.Tensor, cache, press, report: dict | None = None) -> torch.Tensor:
    """Compressed prefill of the context; returns the last position's logits. A cache with an
    `after_prefill` hook (fmkvc with refine_steps) then reworks itself on the context's newest
    tokens, whose dense predictions this same prefill gives (its attention reads the cache before
    compression); what the hook returns (the refinement's tail KL before and after) goes into `report`."""
    n = ids.shape[-1]
    hook = getattr(cache, "after_prefill", None)
    tail = cache.tail_tokens(n) if hook is not None else 1
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids[None], past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(n)[None], logits_to_keep=tail)
    info = hook(model, out, input_ids=ids[None]) if hook is not None else None
    if info and report is not None:
        report.update(info)
    return out.logits[0, -1]


def extend(model, ids: torch.Tensor, cache, start: int, logits_to_keep: int = 0):
    """Read more tokens (no pruning) at true positions start..start+len-1."""
    return model(input_ids=ids[None], past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(start, start + ids.shape[-1])[None], logits_to_keep=logits_to_keep).logits[0]


# ---- data ------------------------------------------------------------------------------------
NAMES = ["amber", "cobalt", "crimson", "ivory", "jade", "onyx", "scarlet", "silver", "topaz", "violet", "copper",
         "indigo", "saffron", "teal", "umber", "golden"]
PLACES = ["vault", "archive", "tower", "harbor", "garden", "library", "bridge", "station"]


def fact_items(tok, n: int, context: int, n_cont: int, seed: int) -> list[dict]:
    """Held-out filler of context + n_cont tokens with a fact inserted early; the last n_cont tokens
    are the continuation scored for perplexity."""
    from compression.trajectories import token_samples

    rng = random.Random(seed)
    filler = token_samples(tok, n, context + n_cont, reverse=True)
    items = []
    for i, fill in enumerate(filler):
        name, place, code = rng.choice(NAMES), rng.choice(PLACES), str(rng.randint(1000, 9999))
        fact = tok(f" The access code of the {name} {place} is {code}.", add_special_tokens=False).input_ids
        question = tok(f"\nQuestion: What is the access code of the {name} {place}?\nAnswer: The access code of "
                       f"the {name} {place} is", add_special_tokens=False).input_ids
        at = int(context * rng.uniform(0.1, 0.3))  # early: inside the compressed windows at every ratio
        ctx = torch.cat([fill[:at], torch.tensor(fact), fill[at:context - len(fact)]])
        items.append({"context": _with_bos(tok, ctx), "continuation": fill[context:], "answer": code,
                      "question": torch.tensor(question), "fact_pos": at})
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
def eval_method(model, tok, items, name, cfg, ratio, eos_ids, dense_attn=None):
    """One compressed prefill per item, then: continuation perplexity + attention cosine, question,
    greedy answer (exact match); item 0 then keeps decoding to time ms/token."""
    from compression.cache import cache_nbytes

    nll, count, cos, nbytes, entries, hits, attn_all, times, prefill_ms = 0.0, 0, [], [], [], [], [], [], []
    refined: list[dict] = []
    for i, it in enumerate(items):
        ctx, cont = it["context"], it["continuation"]
        cache, press = make_method(name, model, cfg, ratio, len(ctx), tok)
        t0 = time.perf_counter()
        report: dict = {}
        last = prefill(model, ctx, cache, press, report)
        if "kl_start" in report:
            refined.append(report)
        prefill_ms.append((time.perf_counter() - t0) * 1000)
        nbytes.append(cache_nbytes(cache))
        entries.append(max(int(layer.keys.shape[-2]) for layer in cache.layers))
        logits, attn = attention_outputs(model, lambda: extend(model, cont[:-1], cache, len(ctx)))
        logits = torch.cat([last[None], logits], 0).float()
        nll += float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum"))
        count += len(cont)
        attn_all.append(attn)
        if dense_attn is not None:
            cos.extend(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
                       for a, b in zip(attn, dense_attn[i]))
        pos = len(ctx) + len(cont) - 1
        q = torch.cat([cont[-1:], it["question"]])
        logits = extend(model, q, cache, pos, logits_to_keep=1)
        pos += len(q)
        ids, stopped = [], False
        n_steps = 6 + (cfg.decode_tokens if i == 0 else 0)
        for step in range(n_steps):
            nxt = int(logits[-1].argmax())
            if nxt in eos_ids or step >= 6:
                stopped = True
            if not stopped:
                ids.append(nxt)
            elif i > 0:
                break
            t0 = time.perf_counter()
            logits = extend(model, torch.tensor([nxt]), cache, pos, logits_to_keep=1)
            if step >= 8:  # after the answer and a warm-up: steady-state decoding
                times.append((time.perf_counter() - t0) * 1000)
            pos += 1
        hits.append(tok.decode(ids, skip_special_tokens=True).strip().startswith(it["answer"]))
    res = {"perplexity": float(torch.tensor(nll / count).exp()), "fact_recall": sum(hits) / len(hits),
           "kv_bytes": statistics.mean(nbytes), "kv_entries_max_layer": statistics.mean(entries),
           "decode_ms_per_token": statistics.median(times), "decode_ms_p95": sorted(times)[int(0.95 * (len(times) - 1))],
           "prefill_ms": statistics.median(prefill_ms)}
    if cos:
        res["attention_cosine"] = statistics.mean(cos)
    if refined:  # the refinement's own objective on the context's tail, before and after fitting
        res["refine_tail_kl_start"] = statistics.mean(r["kl_start"] for r in refined)
        res["refine_tail_kl_end"] = statistics.mean(r["kl_end"] for r in refined)
    return res, attn_all


@torch.no_grad()
def long_context_timing(model, tok, cfg: EvalConfig, log=print) -> dict:
    """Decode ms/token after `timing_context` tokens, dense vs timing_methods at timing_ratio.

    Shared machines are noisy, so after one prefill per method the decode steps are interleaved
    (dense, method, dense, method, ...): every method sees the same load."""
    from compression.trajectories import token_samples

    doc = _with_bos(tok, token_samples(tok, 1, cfg.timing_context, reverse=True)[0])
    names = ["dense", *cfg.timing_methods]
    state = {}
    for name in names:
        cache, press = make_method(name, model, cfg, 1 if name == "dense" else cfg.timing_ratio, len(doc), tok)
        state[name] = [cache, int(prefill(model, doc, cache, press).argmax()), len(doc), []]
    for step in range(cfg.decode_tokens + 2):
        for name in names:
            cache, nxt, pos, times = state[name]
            t0 = time.perf_counter()
            logits = extend(model, torch.tensor([nxt]), cache, pos, logits_to_keep=1)
            if step >= 2:
                times.append((time.perf_counter() - t0) * 1000)
            state[name][1:3] = [int(logits[-1].argmax()), pos + 1]
    out = {"context": cfg.timing_context, "ratio": cfg.timing_ratio, "interleaved": True,
           "torch_threads": torch.get_num_threads()}
    for name in names:
        times = state[name][3]
        out[name] = {"decode_ms_per_token": statistics.median(times),
                     "decode_ms_p95": sorted(times)[int(0.95 * (len(times) - 1))]}
    for name in cfg.timing_methods:
        out[name]["decode_vs_dense"] = out[name]["decode_ms_per_token"] / out["dense"]["decode_ms_per_token"]
    log(f"decode after {cfg.timing_context} tokens (interleaved): {json.dumps(out)}")
    return out


def run(cfg: EvalConfig, json_out: str, plot_out: str | None = None, log=print, resume: bool = False) -> dict:
    from compression.base import method_spec
    from compression.presses import nominal_budget
    from latentwire import profiles
    from latentwire.runtime import AgentModel

    model, tok = profiles.load(cfg.model, dtype="float32")
    model.requires_grad_(False)  # frozen: fmkvc_refine's gradients reach only the super-tokens
    eos_ids = AgentModel(cfg.model, model=model, tokenizer=tok).eos_ids
    items = fact_items(tok, cfg.facts, cfg.context, cfg.ppl_tokens, cfg.seed)
    results: dict = {"config": asdict(cfg), "nominal_budget": {}, "methods": {},
                     "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32)"}
    t_start = time.time()
    done = {}
    if resume and Path(json_out).exists():  # keep finished (method, ratio) cells of an interrupted run
        old = json.loads(Path(json_out).read_text())
        defaults = asdict(EvalConfig())  # a field added since the file was written has its default there
        if old.get("config") == results["config"] or all(old["config"].get(k, defaults[k]) == v
                                                          for k, v in asdict(cfg).items() if k not in ("ratios", "methods")):
            results["methods"], done = old["methods"], old["methods"]
            # the file describes every cell it holds: the ratios and methods of both runs
            results["nominal_budget"] = dict(old.get("nominal_budget", {}))
            results["config"]["ratios"] = sorted({*old["config"]["ratios"], *cfg.ratios})
            results["config"]["methods"] = list(dict.fromkeys([*old["config"]["methods"], *cfg.methods]))
    dense_res, dense_attn = eval_method(model, tok, items, "dense", cfg, 1, eos_ids)
    dense_res["attention_cosine"] = 1.0
    results["methods"]["dense"] = {"1": dense_res}
    log(f"dense: {json.dumps(dense_res)} ({time.time() - t_start:.0f}s)")
    for ratio in cfg.ratios:
        results["nominal_budget"][str(ratio)] = nominal_budget(cfg.context, ratio, cfg.sink, cfg.recent)
        for name in cfg.methods:
            if name == "dense":
                continue
            if str(ratio) in done.get(name, {}):
                continue
            t0 = time.time()
            try:
                res, _ = eval_method(model, tok, items, name, cfg, ratio, eos_ids, dense_attn)
            except Exception as exc:  # e.g. a kvpress press that does not support this architecture
                results["methods"].setdefault(name, {})[str(ratio)] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name} x{ratio}: FAILED {type(exc).__name__}: {exc}")
                continue
            if resolve(name, cfg).serves():  # a window method: the layout it used
                res["keep"] = method_spec(name)[1].get("keep", 0)
                res["window"], res["recent"] = window_layout(cfg, ratio, cfg.context, res["keep"])
            res["kv_reduction"] = dense_res["kv_bytes"] / res["kv_bytes"]
            res["perplexity_vs_dense"] = res["perplexity"] / dense_res["perplexity"]
            res["fact_recall_vs_dense"] = res["fact_recall"] / max(dense_res["fact_recall"], 1e-9)
            res["decode_vs_dense"] = res["decode_ms_per_token"] / dense_res["decode_ms_per_token"]
            results["methods"].setdefault(name, {})[str(ratio)] = res
            log(f"{name} x{ratio}: ppl {res['perplexity']:.3f} ({res['perplexity_vs_dense']:.3f}x dense) "
                f"recall {res['fact_recall']:.2f} cos {res['attention_cosine']:.4f} "
                f"kv/{res['kv_reduction']:.2f} decode {res['decode_ms_per_token']:.1f}ms ({time.time() - t0:.0f}s)")
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            results.update(all_goals(results, 8))
            Path(json_out).write_text(json.dumps(results, indent=2))  # partial results survive a kill
    if cfg.timing_context:
        results["decode_long_context"] = long_context_timing(model, tok, cfg, log)
    results.update(all_goals(results, 8))
    results["elapsed_s"] = round(time.time() - t_start, 1)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=2))
    if plot_out:
        plot(results, plot_out)
    return results


def all_goals(results: dict, ratio: int) -> dict:
    """The goals of every FMKVC spec in the results: "goals_8x" for fmkvc, "goals_8x_<spec>" for the
    others (fmkvc_refine, the hybrid fmkvc:keep=K)."""
    from compression.base import method_spec

    out = {"goals_8x": goals(results, ratio)}
    for spec in results["methods"]:
        name = method_spec(spec)[0]
        if spec != "fmkvc" and ALIASES.get(name, (name,))[0] == "fmkvc":
            out[f"goals_{ratio}x_{spec}"] = goals(results, ratio, spec)
    return out


GOAL_BASELINES = (*BASELINES, "kvzip", "mean_pool")  # what FMKVC must beat (mean_pool_mass is an ablation)


def goals(results: dict, ratio: int, method: str = "fmkvc") -> dict:
    """Issue #26's goals for `method` (a --methods spec) at `ratio` (and at 4x where it was run):
    perplexity and fact recall against dense and against every baseline present at the same entries."""
    m = results["methods"]
    r = str(ratio)
    if method not in m or r not in m[method] or "error" in m[method][r]:
        return {}
    f, d = m[method][r], m["dense"]["1"]

    def baselines(at: str) -> dict:
        return {k: v[at] for k, v in m.items() if k in GOAL_BASELINES and at in v and "error" not in v[at]}

    others = baselines(r)
    out = {
        "perplexity_within_5pct_of_dense": f["perplexity"] <= 1.05 * d["perplexity"],
        # None, not a vacuous True, where no baseline ran at this ratio
        "perplexity_better_than_every_baseline": all(f["perplexity"] < o["perplexity"] for o in others.values())
        if others else None,
        "baselines_compared": sorted(others),
        "fact_recall_at_least_80pct_of_dense": f["fact_recall"] >= 0.8 * d["fact_recall"],
        "fact_recall_above_streamingllm_and_mean_pool": all(
            f["fact_recall"] > others[k]["fact_recall"] for k in ("streamingllm", "mean_pool") if k in others)
        if {"streamingllm", "mean_pool"} & set(others) else None,
        **({"fact_recall_above_kvzip": f["fact_recall"] > others["kvzip"]["fact_recall"]} if "kvzip" in others else {}),
        "kv_reduction": f["kv_reduction"],
        "decode_not_slower_than_dense": f["decode_ms_per_token"] <= d["decode_ms_per_token"],
        **({"decode_not_slower_than_dense_long_context": results["decode_long_context"][method]["decode_vs_dense"] <= 1}
           if method in results.get("decode_long_context", {}) else {}),
    }
    f4 = m[method].get("4", {})
    if ratio != 4 and "fact_recall" in f4:  # the 4x recall goal
        out["fact_recall_at_least_95pct_of_dense_at_4x"] = f4["fact_recall"] >= 0.95 * d["fact_recall"]
        kvzip4 = baselines("4").get("kvzip")
        if kvzip4:
            out["fact_recall_above_kvzip_at_4x"] = f4["fact_recall"] > kvzip4["fact_recall"]
    return out


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
            xs = [r for r in ratios if str(r) in per and "error" not in per[str(r)]]
            ax.plot(xs, [per[str(r)][key] for r in xs], marker="o", label=name,
                    lw=2.5 if name.startswith("fmkvc") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r}x" for r in ratios])
        ax.set_title(title)
        ax.set_xlabel("nominal KV ratio")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{results['config']['model']}: {results['config']['context']}-token context, CPU fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
