"""`latentwire eval --budgets ...`: exact match against the message budget M, per mode.

For each item the source reads its prompt once (`latentwire.selection`: the selector's attention
layer and the bridge's layer in one forward); then, for every budget M,
- LATENT@M: the bridge's soft tokens of the at most M context tokens the selector keeps,
- EXTRACT@M: the same kept tokens sent as text (the extractive relay, no generation),
- TEXT@M (`--text-budgets`): a message of at most M tokens the source writes,
beside DIRECT (the target reads the whole context) and NONE (only the question). `full` is the
unbudgeted packet (every context token). `latent_selectors` adds LATENT@M of other selectors on
the same read (mode `latent-<name>@M`), e.g. the slot-merging `merge` (latentwire.merging) beside
today's LATENT and EXTRACT. Every payload goes through the serving functions of
`latentwire.runtime.AgentModel`, rounded to the wire dtype as over gRPC. The metrics are those of
`bridge.eval` (EM, F1, answer NLL, transfer ratio, diversity, soft-token cosine and RMS ratio),
plus per mode the message's token count and the positions the target prefills.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from bridge.eval import chance_em, diversity, exact_match, item_nll, soft_token_stats, token_f1, transfer_ratio
from latentwire.codec import wire
from latentwire.merging import merge_slots
from latentwire.runtime import AgentModel
from latentwire.selection import Selector, extract_text, keep_tokens, question_attention

FULL = None  # the budget of the unbudgeted packet


def budget_name(b: int | None) -> str:
    return "full" if b is None else str(b)


def parse_budgets(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part == "full":
            out.append(FULL)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"--budgets takes positive integers and 'full', not {part!r}")
    return out


@torch.no_grad()
def evaluate(items: list[dict], source: AgentModel, target: AgentModel, bridge, selector: Selector, *,
             budgets: list[int | None], text_budgets: list[int] = (), extract: bool = True,
             baselines: tuple[str, ...] = ("direct", "none"), max_new_tokens: int = 16,
             wire_dtype: str | None = "bfloat16", nll: bool = True, progress: bool = True,
             latent_selectors: dict[str, Selector] | None = None) -> dict:
    layer = bridge.cfg.source_layer
    latent_selectors = latent_selectors or {}
    if any(s.needs_attention_layer not in (None, selector.needs_attention_layer) for s in latent_selectors.values()):
        raise ValueError("--latent-selectors share the source's read: they may need no other attention layer")
    extract = extract and not selector.merges_slots  # a merged message has no text within its budget
    recs: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    softs: dict[str, list] = defaultdict(list)

    def score(mode: str, payload, it: dict, t0: float, tokens: int | None = None) -> None:
        gen = target.answer(payload, it["question"], max_new_tokens)
        rec = recs[mode]
        rec["seconds"].append(time.perf_counter() - t0)
        rec["prediction"].append(gen.text)
        rec["em"].append(exact_match(gen.text, it["answer"]))
        rec["f1"].append(token_f1(gen.text, it["answer"]))
        if nll:  # a second target forward per payload: off, EM and F1 only, at half the cost
            rec["nll"].append(item_nll(target, payload, it["question"], it["answer"]))
        rec["target_tokens"].append(int(target.target_inputs(payload, it["question"]).shape[1]))
        if tokens is not None:
            rec["message_tokens"].append(tokens)

    for it in tqdm(items, desc="eval-budgets", disable=not progress):
        ctx, q = it["context"], it["question"]
        t0 = time.perf_counter()
        prompt = source.source_spans(ctx, q)
        ids, span, asked = prompt
        attn_layer = selector.needs_attention_layer
        attention, states = (question_attention(source, ids, asked, span, attn_layer, layer) if attn_layer
                             else (None, source.hidden_states(ids, layer)))
        n = span.stop - span.start
        t_source = time.perf_counter() - t0
        for b in budgets:
            name = budget_name(b)
            for kind, sel in [("latent", selector)] + [(f"latent-{k}", s) for k, s in latent_selectors.items()]:
                t1 = time.perf_counter()
                msg = keep_tokens(source, prompt, q, b, sel, attention, states)
                soft = bridge(wire(msg.states.float(), wire_dtype)[None], token_ids=msg.token_ids[None])[0]
                # slots merged on the bridge's side of the wire, from its per-token soft tokens
                soft = wire(merge_slots(soft, msg.slot_of, msg.slot_weight), wire_dtype)
                softs[f"{kind}@{name}"].append(soft)
                # the source's shared read is charged to every budget, as serving would pay it
                score(f"{kind}@{name}", soft, it, t1 - t_source, len(soft))
                recs[f"{kind}@{name}"]["context_covered"].append(len(msg.positions))  # tokens the slots carry
                if kind == "latent" and extract and b is not None:
                    score(f"extract@{name}", extract_text(source, msg), it, time.perf_counter(), len(msg.positions))
        for b in text_budgets:
            t1 = time.perf_counter()
            gen = source.write_message(ids, b)
            recs[f"text@{b}"]["message"].append(gen.text)
            score(f"text@{b}", gen.text, it, t1, len(gen.token_ids))
        for mode in baselines:
            score(mode, ctx if mode == "direct" else None, it, time.perf_counter())
        recs["_source"]["context_tokens"].append(n)

    result = {"n": len(items), "chance_em": chance_em(items), "gold_diversity": diversity([it["answer"] for it in items]),
              "context_tokens": sum(recs["_source"]["context_tokens"]) / max(1, len(items)), "modes": {}}
    for mode, rec in recs.items():
        if mode.startswith("_"):
            continue
        m = {k: sum(rec[k]) / len(rec[k]) for k in ("em", "f1", "nll", "seconds", "target_tokens", "context_covered")
             if rec[k]}
        m["diversity"] = diversity(rec["prediction"])
        if rec["message_tokens"]:
            m["message_tokens"] = sum(rec["message_tokens"]) / len(rec["message_tokens"])
        if mode in softs:
            m.update(soft_token_stats(softs[mode], target.embed_rms()))
        result["modes"][mode] = m
    if nll and {"none", "direct"} <= set(result["modes"]):
        nll_none, nll_direct = result["modes"]["none"]["nll"], result["modes"]["direct"]["nll"]
        for m in result["modes"].values():
            m["transfer_ratio"] = transfer_ratio(nll_none, m["nll"], nll_direct)
    result["items"] = [{"id": it["id"], "answer": it["answer"],
                        **{mode: rec["prediction"][i] for mode, rec in recs.items() if not mode.startswith("_")}}
                       for i, it in enumerate(items)]
    return result


def table(result: dict) -> str:
    cols = ["em", "f1", "nll", "transfer_ratio", "message_tokens", "target_tokens", "diversity", "pairwise_cosine",
            "seconds"]
    lines = [f"{'mode':14s}" + "".join(f"{c:>15s}" for c in cols)]
    for mode, m in result["modes"].items():
        lines.append(f"{mode:14s}" + "".join(f"{m[c]:15.3f}" if isinstance(m.get(c), float | int) else f"{'-':>15s}"
                                             for c in cols))
    lines.append(f"n={result['n']}  context tokens={result['context_tokens']:.0f}  chance_em={result['chance_em']:.3f}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path, title: str = "") -> Path:
    """EM against the budget M: LATENT, EXTRACT and TEXT curves; DIRECT and NONE as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs_full = max([int(k.split("@")[1]) for k in modes if "@" in k and not k.endswith("@full")] or [64]) * 2
    extra = sorted({k.split("@")[0] for k in modes if k.startswith("latent-")})
    for kind, style in (("latent", "o-"), ("extract", "s--"), ("text", "^:"), *((k, "D-") for k in extra)):
        pts = sorted((xs_full if k.endswith("@full") else int(k.split("@")[1]), m["em"])
                     for k, m in modes.items() if k.startswith(kind + "@"))
        if pts:
            ax.plot(*zip(*pts), style, label=kind.upper())
    for mode, colour in (("direct", "green"), ("none", "grey")):
        if mode in modes:
            ax.axhline(modes[mode]["em"], color=colour, linestyle="-.", label=mode.upper())
    ax.set_xscale("log", base=2)
    ticks = sorted({int(k.split("@")[1]) for k in modes if "@" in k and not k.endswith("@full")})
    labels = [str(t) for t in ticks]
    if any(k.endswith("@full") for k in modes):
        ticks, labels = ticks + [xs_full], labels + [f"full (~{result['context_tokens']:.0f})"]
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("message budget M (tokens / soft tokens)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"EM vs budget, n={result['n']}, ~{result['context_tokens']:.0f} context tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _selector_spec(spec: str) -> tuple[str, dict[str, int | float]]:
    """`name` or `name:key=value;key=value` (numbers) -> (name, {params}), for `--latent-selectors`."""
    name, _, rest = spec.partition(":")
    params = {}
    for part in filter(None, rest.split(";")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--latent-selectors: {spec!r}: parameters are key=value, not {part!r}")
        params[key.strip()] = float(value) if "." in value else int(value)
    return name, params


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from bridge.data import read_jsonl
    from bridge.load import default_weights_path, load_bridge
    from latentwire.selection import make_selector
    from latentwire.settings import Limits

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    items = read_jsonl(args.data, args.limit)
    bridge = load_bridge(args.bridge or default_weights_path(), search_dtype=args.search_dtype,
                         token_index=args.token_index)
    limits = Limits(max_context_tokens=args.max_context_tokens)
    target = AgentModel(bridge.cfg.target_model, prefill_dtype=args.prefill_dtype, limits=limits)
    source = AgentModel(bridge.cfg.source_model, prefill_dtype=args.prefill_dtype, limits=limits)
    params = json.loads(args.selector_params) if args.selector_params else {}
    selector = make_selector(args.selector, **params)
    specs = [n.strip() for n in getattr(args, "latent_selectors", "").split(",") if n.strip()]
    latent_selectors = {spec: make_selector(name, **params) for spec, (name, params) in
                        ((spec, _selector_spec(spec)) for spec in specs)}
    modes = {m.strip().lower() for m in args.modes.split(",") if m.strip()}
    text_budgets = [b for b in parse_budgets(args.text_budgets) if b is not None] if "text" in modes else []
    result = evaluate(items, source, target, bridge, selector, budgets=parse_budgets(args.budgets),
                      text_budgets=text_budgets, extract="extract" in modes,
                      baselines=tuple(m for m in ("direct", "none") if m in modes),
                      max_new_tokens=args.max_new_tokens, wire_dtype=args.wire_dtype, nll=not args.no_nll,
                      latent_selectors=latent_selectors)
    result["config"] = {"data": str(args.data), "selector": args.selector, "selector_params": params,
                        "latent_selectors": sorted(latent_selectors),
                        "limit": args.limit, "nll": not args.no_nll,
                        "budgets": args.budgets, "text_budgets": args.text_budgets,
                        "bridge": str(args.bridge or default_weights_path()), "bridge_id": bridge.bridge_id,
                        "bridge_sha256": bridge.sha256, "max_new_tokens": args.max_new_tokens,
                        "wire_dtype": args.wire_dtype, "source": source.name, "target": target.name}
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0
