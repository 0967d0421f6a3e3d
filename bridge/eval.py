"""`latentwire eval`: fact transfer per mode (LATENT, TEXT, DIRECT, NONE) on a JSONL file.

Every mode runs the serving path of `latentwire.runtime.AgentModel`:
  source: `source_prompt(context, question)` -> LATENT `hidden_states(ids, bridge layer)[context span]`
          -> the bridge's forward
          (both packets rounded to the wire dtype, bf16 by default, as over gRPC)
          | TEXT `write_message(ids, M)` (M = 64 tokens, the benchmark's message budget)
  target: `answer(payload, question, max_new_tokens)` for the generated answer, and
          `target_inputs(payload, question)` + teacher-forced answer tokens for the NLL
          (`bridge.objective`, the same code the training loss uses).

Metrics (answers normalised: lower case, punctuation dropped, whitespace collapsed):
- `em`: the normalised gold answer occurs in the normalised prediction as a whole-word span
  ("Marco was born in 1989." counts for "1989"); `em_exact`: the two are equal. Both are reported
  because a base model often answers in a sentence; `em` is the headline figure.
- `f1`: SQuAD-style token F1 between normalised prediction and gold.
- `nll`: mean over items of the mean per-token NLL of the gold answer tokens under the target.
- `transfer_ratio`: (NLL_none - NLL_mode) / (NLL_none - NLL_direct): 0 = no better than no
  information, 1 = as good as reading the context itself.
- `diversity`: distinct normalised predictions / n (1 item per answer; collapse drives it to 1/n).
- `pairwise_cosine`, `rms_ratio` (LATENT): mean cosine between items' mean soft tokens, and
  soft-token RMS / target embedding RMS (`soft_token_stats`).
- `chance_em`: the EM of guessing answers at their frequency in the file (sum_a p(a)^2, within
  each `kind` when items carry one): what NONE should stay near.
- `gold_diversity`: distinct gold answers / n, the diversity a perfect reader gets; and
  `context_embedding_cosine` (LATENT): `pairwise_cosine` of the target's own embeddings of the
  contexts, what soft tokens that spell the context have without any collapse.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import torch.nn.functional as F

from bridge.base import BridgeBase
from bridge.load import default_weights_path, load_bridge
from bridge.objective import answer_nll, build_batch
from latentwire.codec import wire
from latentwire.runtime import AgentModel
from latentwire.selection import Selector, make_selector, plan_message

MODES = ("latent", "text", "direct", "none")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


# ---- metric functions ----------------------------------------------------------------------
def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold occurs as a whole-word span in the normalised prediction."""
    p, g = normalize(prediction), normalize(gold)
    return float(bool(g) and f" {g} " in f" {p} ")


def exact_match_strict(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def transfer_ratio(nll_none: float, nll_mode: float, nll_direct: float) -> float:
    gap = nll_none - nll_direct
    return float("nan") if abs(gap) < 1e-9 else (nll_none - nll_mode) / gap


def diversity(predictions: list[str]) -> float:
    return len({normalize(p) for p in predictions}) / max(1, len(predictions))


def chance_em(items: list[dict]) -> float:
    """EM of guessing answers with their empirical frequency (per `kind` if present)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for it in items:
        groups[it.get("kind", "")].append(normalize(it["answer"]))
    total = 0.0
    for answers in groups.values():
        counts = Counter(answers)
        total += sum(c * c for c in counts.values()) / len(answers)  # n_g * sum p^2
    return total / max(1, len(items))


def soft_token_stats(soft: torch.Tensor | list[torch.Tensor], target_rms: float) -> dict[str, float]:
    """Collapse diagnostics for a batch of soft tokens (B, K, d), or a list of (K_i, d) when the
    number of soft tokens varies per item (the aligned bridge: one per context token)."""
    items = [s.detach().float() for s in soft]
    flat = F.normalize(torch.stack([s.mean(0) for s in items]), dim=-1)  # one vector per item
    b = flat.shape[0]
    cos = (flat @ flat.T)[~torch.eye(b, dtype=torch.bool)].mean() if b > 1 else torch.tensor(float("nan"))
    rms = torch.cat([s.pow(2).mean(-1).sqrt() for s in items]).mean()
    return {"pairwise_cosine": float(cos), "rms_ratio": float(rms / target_rms)}


# ---- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def soft_tokens(source: AgentModel, bridge: BridgeBase, context: str, question: str,
                wire_dtype: str | None = "bfloat16", budget: int | None = None,
                selector: Selector | None = None) -> torch.Tensor:
    """The LATENT packet for one item, exactly as serving computes it: the states of the at most
    `budget` context tokens `selector` keeps (default: every context token; lexical) -> (K, d_tgt)."""
    msg = plan_message(source, context, question, budget, selector or make_selector("lexical"),
                       state_layer=bridge.cfg.source_layer)
    h = wire(msg.states.float(), wire_dtype)
    return wire(bridge(h[None], token_ids=msg.token_ids[None])[0], wire_dtype)


@torch.no_grad()
def item_nll(target: AgentModel, payload, question: str, answer: str) -> float:
    return float(answer_nll(target, build_batch(target, [payload], [question], [answer]))[1][0])


@torch.no_grad()
def evaluate(items: list[dict], modes: list[str], source: AgentModel | None, target: AgentModel,
             bridge: BridgeBase | None = None, *, message_tokens: int = 64, max_new_tokens: int = 16,
             wire_dtype: str | None = "bfloat16", progress: bool = True) -> dict:
    bad = set(modes) - set(MODES)
    if bad:
        raise ValueError(f"unknown modes {sorted(bad)}; known: {list(MODES)}")
    if "latent" in modes and bridge is None:
        raise ValueError("mode latent needs a bridge")
    if {"latent", "text"} & set(modes) and source is None:
        raise ValueError("modes latent and text need a source model")
    per_mode: dict[str, dict] = {m: defaultdict(list) for m in modes}
    softs = []
    for it in tqdm(items, desc="eval", disable=not progress):
        ctx, q, gold = it["context"], it["question"], it["answer"]
        for mode in modes:
            rec = per_mode[mode]
            t0 = time.perf_counter()
            if mode == "latent":
                payload = soft_tokens(source, bridge, ctx, q, wire_dtype, budget=message_tokens)
                softs.append(payload)
            elif mode == "text":
                msg = source.write_message(source.source_ids(ctx, q), message_tokens)
                payload = msg.text
                rec["message_tokens"].append(len(msg.token_ids))
            else:
                payload = ctx if mode == "direct" else None
            gen = target.answer(payload, q, max_new_tokens)
            rec["seconds"].append(time.perf_counter() - t0)
            rec["prediction"].append(gen.text)
            rec["em"].append(exact_match(gen.text, gold))
            rec["em_exact"].append(exact_match_strict(gen.text, gold))
            rec["f1"].append(token_f1(gen.text, gold))
            rec["nll"].append(item_nll(target, payload, q, gold))
            if mode == "text":
                rec["message"].append(payload)
    # references for two metrics whose goal values assume more than the data allows: answers repeat
    # (distinct gold answers / n caps diversity), and contexts share templates and words (the target's
    # own embeddings of the contexts already have a high pairwise cosine; collapse is well above it)
    result = {"n": len(items), "chance_em": chance_em(items), "gold_diversity": diversity([it["answer"] for it in items]),
              "modes": {}}
    for mode, rec in per_mode.items():
        m = {k: sum(rec[k]) / len(rec[k]) for k in ("em", "em_exact", "f1", "nll", "seconds")}
        m["diversity"] = diversity(rec["prediction"])
        if mode == "text":
            m["message_tokens"] = sum(rec["message_tokens"]) / len(rec["message_tokens"])
        if mode == "latent":
            m.update(soft_token_stats(softs, target.embed_rms()))
            ctx = [target.embed(target.tokenize(it["context"])[None])[0].float() for it in items]
            m["context_embedding_cosine"] = soft_token_stats(ctx, target.embed_rms())["pairwise_cosine"]
        result["modes"][mode] = m
    if {"none", "direct"} <= set(modes):
        nll_none, nll_direct = result["modes"]["none"]["nll"], result["modes"]["direct"]["nll"]
        for mode, m in result["modes"].items():
            m["transfer_ratio"] = transfer_ratio(nll_none, m["nll"], nll_direct)
    result["items"] = [
        {"id": it["id"], "answer": it["answer"], **{mode: per_mode[mode]["prediction"][i] for mode in modes},
         **({"message": per_mode["text"]["message"][i]} if "text" in modes else {})}
        for i, it in enumerate(items)]
    return result


def table(result: dict) -> str:
    cols = ["em", "em_exact", "f1", "nll", "transfer_ratio", "diversity", "pairwise_cosine", "rms_ratio", "seconds"]
    lines = [f"{'mode':8s}" + "".join(f"{c:>16s}" for c in cols)]
    for mode, m in result["modes"].items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{'-':>16s}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:16.3f}")
        lines.append(f"{mode:8s}" + "".join(cells))
    lines.append(f"n={result['n']}  chance_em={result['chance_em']:.3f}  gold_diversity={result['gold_diversity']:.3f}"
                 + (f"  context_embedding_cosine={result['modes']['latent']['context_embedding_cosine']:.3f}"
                    if "latent" in result["modes"] else ""))
    return "\n".join(lines)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from bridge.data import read_jsonl

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip().lower() for m in args.modes.split(",") if m.strip()]
    items = read_jsonl(args.data, args.limit)
    bridge = None
    if "latent" in modes:
        bridge = load_bridge(args.bridge or default_weights_path(), search_dtype=args.search_dtype,
                             token_index=getattr(args, "token_index", "none"))
    source_name = bridge.cfg.source_model if bridge else args.source
    target_name = bridge.cfg.target_model if bridge else args.target
    target = AgentModel(target_name, prefill_dtype=args.prefill_dtype)
    source = AgentModel(source_name, prefill_dtype=args.prefill_dtype) if {"latent", "text"} & set(modes) else None
    result = evaluate(items, modes, source, target, bridge, message_tokens=args.message_tokens,
                      max_new_tokens=args.max_new_tokens, wire_dtype=args.wire_dtype)
    result["config"] = {"data": str(args.data), "modes": modes, "source": source_name, "target": target_name,
                        "bridge": str(args.bridge or default_weights_path()) if bridge else None,
                        "bridge_id": bridge.bridge_id if bridge else None,
                        "bridge_sha256": bridge.sha256 if bridge else None,
                        "message_tokens": args.message_tokens, "max_new_tokens": args.max_new_tokens,
                        "wire_dtype": args.wire_dtype,
                        "search_dtype": str(getattr(bridge, "search_dtype", "")).removeprefix("torch.") or None,
                        "token_index": getattr(bridge, "token_index", None) is not None,
                        "prefill_dtype": str(target.prefill_dtype).removeprefix("torch.")}
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0
