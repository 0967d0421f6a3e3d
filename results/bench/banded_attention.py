"""Banded SDPA (latentwire/attention.py) against transformers' SDPA, side by side, in the target's prefill.

    .venv/bin/python results/bench/banded_attention.py [--context-tokens 1024,1800] [--prompts 4] [--rounds 3]

For each context length: the bench's LATENT prompts (soft tokens from the packaged bridge), prefilled
by the target with the agents' default prefill dtype, with one attention and then the other, in
alternating order round after round (this machine's speed drifts by up to 2x within minutes); then
the greedy answers (8 tokens) and the last prompt position's logits under both.
1800 tokens, not 2048: the agents refuse prompts over `max_context_tokens` (2048, template included).
Writes results/bench/banded_attention.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from prefill_bound import prompts  # noqa: E402  (the same LATENT prompts as that script)

ATTENTIONS = ("sdpa", "banded_sdpa")


def use(target, name: str) -> None:
    for model in (target.model, target.engine.prefill_model):  # the bfloat16 prefill copy has its own config
        if model is not None:
            model.set_attn_implementation(name)


def last_logits(target, embeds: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    n = embeds.shape[0]
    with torch.no_grad():
        out = target.engine.prefill(embeds[None], torch.ones(1, n, dtype=torch.long), torch.arange(n)[None],
                              DynamicCache(config=target.model.config))
    return out.logits[0, -1].float()


def measure(context_tokens: int, n: int, rounds: int, threads: int) -> dict:
    target, embeds = prompts(context_tokens, n, threads)
    ms: dict[str, list[float]] = {a: [] for a in ATTENTIONS}
    target.generate(embeds[0][None], 1)  # warm-up
    for r in range(rounds):
        for name in (ATTENTIONS if r % 2 == 0 else ATTENTIONS[::-1]):
            use(target, name)
            ms[name] += [target.generate(e[None], 1).prefill_ms for e in embeds]
    answers, logits = {}, {}
    for name in ATTENTIONS:
        use(target, name)
        answers[name] = [target.generate(e[None], 8).text for e in embeds]
        logits[name] = last_logits(target, embeds[0])
    med = {a: statistics.median(v) for a, v in ms.items()}
    return {
        "context_tokens": context_tokens,
        "prompt_tokens": [int(e.shape[0]) for e in embeds],
        "prefill_ms_median": med,
        "prefill_ms": ms,
        "banded_vs_sdpa": med["banded_sdpa"] / med["sdpa"],
        "same_answers": sum(a == b for a, b in zip(answers["sdpa"], answers["banded_sdpa"])),
        "answers": answers,
        "last_logits_max_abs_diff": float((logits["sdpa"] - logits["banded_sdpa"]).abs().max()),
        "last_logits_same_argmax": bool(logits["sdpa"].argmax() == logits["banded_sdpa"].argmax()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context-tokens", default="1024,1800")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "banded_attention.json"))
    args = ap.parse_args()
    from services.bench import hardware

    runs = [measure(int(c), args.prompts, args.rounds, args.threads) for c in args.context_tokens.split(",")]
    report = {"command": "results/bench/banded_attention.py " + " ".join(sys.argv[1:]), "hardware": hardware(),
              "threads": args.threads, "runs": runs}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for r in runs:
        print(f"{r['context_tokens']} tokens: prefill median {r['prefill_ms_median']['sdpa']:.0f} ms sdpa, "
              f"{r['prefill_ms_median']['banded_sdpa']:.0f} ms banded ({r['banded_vs_sdpa']:.2f}x); "
              f"same answers {r['same_answers']}/{len(r['answers']['sdpa'])}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, name in enumerate(ATTENTIONS):
        ax.bar([k + j * 0.4 for k in range(len(runs))], [r["prefill_ms_median"][name] for r in runs], width=0.4,
               label=name)
    ax.set_xticks([k + 0.2 for k in range(len(runs))], [f"{r['context_tokens']} tokens" for r in runs])
    ax.set_ylabel("median target prefill, ms")
    ax.set_title("Target prefill of LATENT prompts: SDPA vs banded SDPA", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
