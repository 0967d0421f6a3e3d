"""`latentwire eval-session`: conversations of many turns on one target, dense vs compressed session memory.

Each session is a conversation with the target as an agent serves it (`latentwire.sessions.SessionCaches`
over `AgentModel`, the same code path as a Receive with a session id): turn t delivers one new record
as text ("Vera has an apartment in Quito.") inside `filler_tokens` of prose, and asks about the record
of an earlier turn a <= t (half the questions about one of the first four turns); the answer must
name its value. Records come from the validation split of `bridge.data` (names, values and sentence
templates that no training job reads) and the prose from `bridge.records`' validation corpus
(standard-library docstrings); within a session every (person, relation) is asked once it is known,
values are unique per relation and never occur in the prose, so an answer cannot be right by luck
from elsewhere in the conversation.

Per method: recall (the value as a whole word in the answer, `bridge.eval.exact_match`) against
turn distance t - a; recall of early facts (a < 4, asked in the second half of the conversation); the
KV bytes the session's cache holds after each turn (`compression.cache.cache_nbytes`); per-turn
latency (the wall time of the turn, prefill and decode). Methods run one after another on each
session, so every method sees the same machine load.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compression.base import method_spec

RELATIONS = ("city", "age", "year", "room", "date", "pet")  # relations with many values in the validation split
EARLY = 4  # records of the first turns: "early facts"
BUCKETS = ((0, 0), (1, 3), (4, 7), (8, 15), (16, 31), (32, 1 << 30))


@dataclass
class SessionEvalConfig:
    model: str = "gemma3-270m"
    methods: list[str] = field(default_factory=lambda: ["dense", "fmkvc", "streamingllm", "snapkv", "knorm"])
    sessions: int = 8
    turns: int = 32
    ratio: int = 8  # window methods: W; pruning baselines: the same entries per layer
    sink: int = 4
    recent: int = 64  # newest entries kept exact
    filler_tokens: int = 96  # prose around each turn's record (about; 4.4 characters a token)
    max_new_tokens: int = 8
    split: str = "val"
    seed: int = 0
    weights: str | None = None  # fmkvc sidecar; None: the packaged one for the model
    # what each turn asks: "current" its own record (what a conversation mostly does; the answers that
    # stay in the session are then mostly right), "mixed" an earlier record half the time
    asks: str = "current"
    # probe questions after each turn t >= EARLY, each about an earlier record (the first about an early
    # one), answered from a copy of the session's cache that is then dropped: the question comes after
    # compression and its answer never enters the conversation
    probes: int = 2


# ---- conversations -------------------------------------------------------------------------------
def conversations(cfg: SessionEvalConfig) -> list[list[dict]]:
    """cfg.sessions conversations of cfg.turns turns: {"text", "question", "answer", "asked", "distance"}."""
    from bridge.data import RELATIONS as SPECS
    from bridge.data import _value, templates, vocabulary
    from bridge.records import CHARS_PER_TOKEN, _mentions, prose

    voc, tpl, text = vocabulary(cfg.split), templates(cfg.split), prose(cfg.split)
    rng = random.Random(f"eval-session:{cfg.split}:{cfg.seed}")
    pick = lambda slot: rng.choice(voc[slot])  # noqa: E731
    out = []
    for _ in range(cfg.sessions):
        used: dict[str, set[str]] = {r: set() for r in RELATIONS}
        keys: set[tuple[str, str]] = set()
        records, turns = [], []
        for t in range(cfg.turns):
            while True:
                person, rel = rng.choice(voc["p"]), rng.choice(RELATIONS)
                value = _value(rel, pick)
                if (person, rel) not in keys and value.lower() not in used[rel] and not any(
                        _mentions(v, value) or _mentions(value, v) for r in used for v in used[r]):
                    break
            keys.add((person, rel))
            used[rel].add(value.lower())
            record = rng.choice(tpl[rel][0]).format(p=person, **{SPECS[rel][0]: value})
            records.append((person, rel, value))
            while True:  # prose that mentions no value or person of the session
                start, body, size = rng.randrange(len(text)), [], 0
                while size < cfg.filler_tokens * CHARS_PER_TOKEN:
                    s = text[(start + len(body)) % len(text)]
                    body.append(s)
                    size += len(s) + 1
                joined = " ".join(body)
                if not any(_mentions(joined, w) for p, _, v in records for w in (p, v)):
                    break
            body.insert(rng.randrange(len(body) + 1), record)
            asked = rng.randrange(min(t, EARLY - 1) + 1) if rng.random() < 0.5 else rng.randrange(t + 1)
            if cfg.asks == "current":  # the same draws either way: records and prose do not depend on it
                asked = t
            p, r, v = records[asked]
            turns.append({"text": " ".join(body), "question": rng.choice(tpl[r][1]).format(p=p), "answer": v,
                          "asked": asked, "distance": t - asked, "probes": []})
        probe_rng = random.Random(f"eval-session-probes:{cfg.split}:{cfg.seed}:{len(out)}")
        for t in range(EARLY, cfg.turns):
            for k in range(cfg.probes):
                asked = probe_rng.randrange(EARLY) if k == 0 else probe_rng.randrange(t)
                p, r, v = records[asked]
                turns[t]["probes"].append({"question": probe_rng.choice(tpl[r][1]).format(p=p), "answer": v,
                                           "asked": asked, "distance": t - asked})
        out.append(turns)
    return out


# ---- running -------------------------------------------------------------------------------------
def agent_for(spec: str, cfg: SessionEvalConfig, model, tok):
    """The target as an agent with `spec`'s session memory (None for dense: transformers' cache)."""
    from compression.session import factory
    from latentwire.runtime import AgentModel

    name, layout = method_spec(spec)
    cache_factory = None
    if name != "dense":
        options = {"weights": cfg.weights} if name == "fmkvc" and cfg.weights else {}
        # the agents' default (KVCompression.sliding_layers); pruning baselines keep their sliding
        # layers' newest entries whatever it says
        layout = {"sliding_layers": "newest", **layout}
        if layout.get("select", "window") != "window":  # the repeat prompt of context reconstruction
            layout["tokenizer"] = tok
        cache_factory = factory(method=name, profile=cfg.model, window=cfg.ratio * (layout.get("keep", 0) + 1),
                                sink=cfg.sink, recent=cfg.recent, **layout, **options)
    return AgentModel(cfg.model, model=model, tokenizer=tok, cache_factory=cache_factory)


def run_session(agent, turns: list[dict], cfg: SessionEvalConfig, sid: str) -> list[dict]:
    import torch

    from bridge.eval import exact_match
    from compression.cache import cache_nbytes
    from compression.reconstruction import fork
    from latentwire.sessions import SessionCaches
    from latentwire.settings import SessionLimits

    store = SessionCaches(SessionLimits(max_sessions=1, max_tokens=1 << 30, idle_s=1e9))
    rows = []
    for t, turn in enumerate(turns):
        t0 = time.perf_counter()
        gen, s = store.answer(agent, sid, t, turn["text"], turn["question"], cfg.max_new_tokens)
        ms = (time.perf_counter() - t0) * 1000
        cache = s.state
        rows.append({"turn": t, "distance": turn["distance"], "asked": turn["asked"], "answer": gen.text,
                     "hit": exact_match(gen.text, turn["answer"]), "ms": ms, "prefill_ms": gen.prefill_ms,
                     "decode_ms": gen.decode_ms, "kv_bytes": cache_nbytes(cache), "kv_entries": s.tokens,
                     "tokens": cache.get_seq_length(), "probes": []})
        for probe in turn["probes"]:
            with torch.no_grad():
                got = agent.generate(agent.target_inputs(None, probe["question"]), cfg.max_new_tokens,
                                     cache=fork(cache))
            rows[-1]["probes"].append({"turn": t, "asked": probe["asked"], "distance": probe["distance"],
                                       "answer": got.text, "hit": exact_match(got.text, probe["answer"])})
    return rows


def recall(sel) -> dict:
    sel = list(sel)
    return {"recall": sum(r["hit"] for r in sel) / len(sel), "n": len(sel)} if sel else {"recall": None, "n": 0}


def by_distance(rows: list[dict]) -> dict:
    return {f"{lo}-{hi}" if hi < 1 << 30 else f"{lo}+": recall(r for r in rows if lo <= r["distance"] <= hi)
            for lo, hi in BUCKETS}


def summarize(rows: list[dict], turns: int) -> dict:

    last = [r for r in rows if r["turn"] == turns - 1]
    ms = sorted(r["ms"] for r in rows)
    by_turn = {}
    for t in range(turns):
        sel = [r for r in rows if r["turn"] == t]
        by_turn[str(t)] = {"kv_bytes": statistics.mean(r["kv_bytes"] for r in sel),
                           "tokens": statistics.mean(r["tokens"] for r in sel),
                           "ms_p50": statistics.median(r["ms"] for r in sel), "recall": recall(sel)["recall"]}
    probes = [p for r in rows for p in r["probes"]]
    return {
        **recall(rows),
        "recall_early": recall(r for r in rows if r["asked"] < EARLY and r["turn"] >= turns // 2),
        "recall_by_distance": by_distance(rows),
        # probes: questions after compression about earlier records, answered on a copy of the cache
        "probe_recall": recall(probes),
        "probe_recall_early": recall(p for p in probes if p["asked"] < EARLY and p["turn"] >= turns // 2),
        "probe_recall_by_distance": by_distance(probes),
        "empty_answers": sum(not r["answer"].strip() for r in rows) + sum(not p["answer"].strip() for p in probes),
        "kv_bytes_final": statistics.mean(r["kv_bytes"] for r in last),
        "kv_entries_final": statistics.mean(r["kv_entries"] for r in last),
        "tokens_final": statistics.mean(r["tokens"] for r in last),
        "turn_ms_p50": statistics.median(ms), "turn_ms_p95": ms[int(0.95 * (len(ms) - 1))],
        "prefill_ms_p50": statistics.median(r["prefill_ms"] for r in rows),
        "decode_ms_p50": statistics.median(r["decode_ms"] for r in rows),
        "by_turn": by_turn,
    }


def run(cfg: SessionEvalConfig, json_out: str, plot_out: str | None = None, log=print, model=None, tok=None) -> dict:
    from latentwire import profiles

    if model is None:
        model, tok = profiles.load(cfg.model, dtype="float32")
    model.requires_grad_(False)
    convs = conversations(cfg)
    agents = {name: agent_for(name, cfg, model, tok) for name in cfg.methods}
    rows: dict[str, list[dict]] = {name: [] for name in cfg.methods}
    errors: dict[str, str] = {}
    t_start = time.time()
    for i, turns in enumerate(convs):
        for name, agent in agents.items():
            if name in errors:
                continue
            t0 = time.time()
            try:
                got = run_session(agent, turns, cfg, f"{name}-{i}")
            except Exception as exc:  # e.g. a press that does not support this architecture
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name}: FAILED {errors[name]}")
                continue
            for r in got:
                r["session"] = i
            rows[name] += got
            probes = [p["hit"] for r in got for p in r["probes"]]
            log(f"session {i} {name}: recall {sum(r['hit'] for r in got) / len(got):.2f} "
                f"probes {sum(probes)}/{len(probes)} "
                f"kv {got[-1]['kv_bytes'] / 2**20:.2f} MiB tokens {got[-1]['tokens']} ({time.time() - t0:.0f}s)")
        results = collect(cfg, rows, errors, t_start, json_out)  # finished sessions survive a kill
    if plot_out:
        plot(results, plot_out)
    return results


def collect(cfg: SessionEvalConfig, rows: dict, errors: dict, t_start: float, json_out: str) -> dict:
    """The results of the sessions run so far, written to `json_out`."""
    import torch

    results: dict = {"config": asdict(cfg), "command_env": {"torch_threads": torch.get_num_threads()},
                     "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32)",
                     "methods": {}, "errors": errors}
    for name in cfg.methods:
        if rows[name]:
            results["methods"][name] = summarize(rows[name], cfg.turns)
    dense = results["methods"].get("dense")
    if dense:
        for name, m in results["methods"].items():
            m["kv_reduction"] = dense["kv_bytes_final"] / m["kv_bytes_final"]
            m["recall_vs_dense"] = m["recall"] / dense["recall"] if dense["recall"] else None
            m["recall_early_vs_dense"] = (m["recall_early"]["recall"] / dense["recall_early"]["recall"]
                                          if dense["recall_early"]["recall"] else None)
            m["probe_recall_early_vs_dense"] = (
                m["probe_recall_early"]["recall"] / dense["probe_recall_early"]["recall"]
                if dense["probe_recall_early"]["recall"] else None)
            m["turn_ms_p50_vs_dense"] = m["turn_ms_p50"] / dense["turn_ms_p50"]
        for name in results["methods"]:
            if method_spec(name)[0] == "fmkvc":
                results["goals_" + name] = goals(results, name)
    results["sessions_done"] = min((len({r["session"] for r in rs}) for rs in rows.values() if rs), default=0)
    results["answers"] = {name: [{**{k: r[k] for k in ("session", "turn", "asked", "hit", "answer")},
                                  "probes": [{k: p[k] for k in ("asked", "hit", "answer")} for p in r["probes"]]}
                                 for r in rs]
                          for name, rs in rows.items()}
    results["elapsed_s"] = round(time.time() - t_start, 1)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def goals(results: dict, method: str) -> dict:
    """The issue's session goals for `method` against the dense session."""
    cfg, m, d = results["config"], results["methods"][method], results["methods"]["dense"]
    early = m["probe_recall_early_vs_dense"] if cfg.get("probes") else m["recall_early_vs_dense"]
    return {
        "sessions_of_32_turns_and_4096_tokens": cfg["turns"] >= 32 and d["tokens_final"] >= 4096,
        "kv_reduction": m["kv_reduction"],
        "kv_at_least_6x_smaller": m["kv_reduction"] >= 6,
        # early facts as the probes ask them (after compression, answers kept out of the session) when
        # the run has probes, else as the turns ask them
        "recall_early_from": "probes" if cfg.get("probes") else "turns",
        "recall_early_vs_dense": early,
        "recall_early_at_least_80pct_of_dense": (early or 0) >= 0.8,
        "turn_p50_vs_dense": m["turn_ms_p50_vs_dense"],
        "turn_p50_not_slower_than_dense": m["turn_ms_p50_vs_dense"] <= 1.0,
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for name, m in results["methods"].items():
        style = dict(marker="o", lw=2.5 if name.startswith("fmkvc") else 1.2, ls="--" if name == "dense" else "-", label=name)
        curve = m["probe_recall_by_distance"] if m.get("probe_recall", {}).get("n") else m["recall_by_distance"]
        buckets = [b for b, v in curve.items() if v["n"]]
        axes[0].plot(buckets, [curve[b]["recall"] for b in buckets], **style)
        turns = sorted(m["by_turn"], key=int)
        axes[1].plot([int(t) for t in turns], [m["by_turn"][t]["kv_bytes"] / 2**20 for t in turns], **style)
        axes[2].plot([int(t) for t in turns], [m["by_turn"][t]["ms_p50"] for t in turns], **style)
    probed = any(m.get("probe_recall", {}).get("n") for m in results["methods"].values())
    axes[0].set(title="probe recall (EM) vs turn distance" if probed else "recall (EM) vs turn distance",
                xlabel="turns between record and question", ylim=(0, 1.05))
    axes[1].set(title="session KV cache (MiB)", xlabel="turn")
    axes[2].set(title="per-turn latency p50 (ms)", xlabel="turn")
    axes[2].legend(fontsize=8)
    c = results["config"]
    done = min(len({a["session"] for a in rs}) for rs in results["answers"].values() if rs)
    fig.suptitle(f"{c['model']}: {done} sessions x {c['turns']} turns, {c['ratio']}x budget, "
                 f"recent {c['recent']} exact; {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
