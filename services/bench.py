"""`latentwire bench`: LATENT vs TEXT (and DIRECT) through the real gRPC stack, side by side.

Requests of every mode are interleaved in one run, so all modes see the same machine load; each
(context size, concurrency) setting runs after a warm-up and is split into repeats, so the
LATENT/TEXT speedup comes with its spread. The session workload (`session_turns` > 0) runs K
sessions of N turns against every target at once (K: each concurrency), each turn delivering a new
fact and asking about it, so dense and compressed session memories are side by side in one load:
per-turn latency, the session's KV cache at its last turn, answers. Output: compact tables, JSON and a PNG.
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc

from services.report import STAGES

BATCHES = ["source_batch", "bridge_batch", "target_batch"]  # requests sharing each forward pass

FACTS = [
    ("The courier for the northern route is {name}.", "Who is the courier for the northern route?"),
    ("The spare key is kept in {place}.", "Where is the spare key kept?"),
    ("Order {num} contained blue ceramic tiles.", "Which order contained blue ceramic tiles?"),
]
NAMES = ["Helena Varga", "Tomas Lindqvist", "Amara Okafor", "Ravi Menon", "Lucia Ferreira", "Jonas Weber"]
PLACES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Kyoto", "Tallinn"]


class BenchItem(NamedTuple):
    context: str
    question: str
    answer: str  # the planted fact's name, place or number


def bench_items(n: int, context_tokens: int, seed: int = 0) -> list[BenchItem]:
    """n items whose context is about `context_tokens` tokens (~4 chars each) of offline text with
    one fact planted at a random point, and a question only that fact answers."""
    from latentwire.textdata import offline_corpus

    rng = random.Random(seed)
    filler = list(itertools.islice(offline_corpus(), 2000))
    items = []
    for i in range(n):
        tmpl, question = FACTS[i % len(FACTS)]
        values = {"name": rng.choice(NAMES), "place": rng.choice(PLACES), "num": str(rng.randint(1000, 9999))}
        fact = tmpl.format(**values)
        answer = next(v for k, v in values.items() if "{" + k + "}" in tmpl)
        words, text = max(0, context_tokens * 4 - len(fact)), []
        while sum(len(t) + 1 for t in text) < words:
            text.append(filler[rng.randrange(len(filler))])
        body = " ".join(text)[:words]
        cut = rng.randint(0, len(body)) if body else 0
        items.append(BenchItem((body[:cut] + " " + fact + " " + body[cut:]).strip(), question, answer))
    return items


def make_items(n: int, context_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, question) pairs of `bench_items`."""
    return [(it.context, it.question) for it in bench_items(n, context_tokens, seed)]


def is_correct(reply: str, answer: str) -> bool:
    """Whether a reply names the planted answer, by the evaluation's exact match (bridge.eval): the
    normalised answer as a whole-word span of the normalised reply."""
    from bridge.eval import exact_match

    return bool(exact_match(reply, answer))


def _pct(xs: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99), interpolated between neighbours like numpy's default, so p50 is
    the median that the LATENT/TEXT speedup divides (a nearest-rank p50 of a two-mode sample, such as
    TEXT's short and full-budget messages, can sit in either mode and disagree with that ratio)."""
    if len(xs) < 2:
        return float(xs[0]) if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def hardware() -> dict:
    import os

    import torch

    from latentwire.runtime import cpu_amx

    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # AMX decides the agents' and the bridge's "auto" dtypes (bfloat16 prefill and search)
            "cpu_amx": cpu_amx()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def run_setting(client, items, modes, concurrency: int, max_new_tokens: int, targets: list[str],
                message_tokens: int) -> list[dict]:
    """Send every item in every (mode, target), shuffled together, with `concurrency` in flight."""
    tasks = [(i, m, t) for i in range(len(items)) for m in modes for t in targets]
    random.Random(concurrency).shuffle(tasks)
    results, lock = [], threading.Lock()

    def one(task):
        i, mode, target = task
        ctx, q, gold = items[i]
        t0 = time.perf_counter()
        rec = {"item": i, "mode": mode, "target": target or "default", "start": t0}
        try:
            r = client.ask(ctx, q, mode, max_new_tokens=max_new_tokens, target_agent=target,
                           message_tokens=message_tokens)
            rec.update(ok=True, e2e_ms=(time.perf_counter() - t0) * 1000, answer=r.answer,
                       bytes=r.packet_bytes, source_tokens=r.source_tokens, message_tokens=r.message_tokens,
                       **{f: getattr(r.timings, f) for f, _ in STAGES}, source_total_ms=r.timings.source_total_ms,
                       **{f: getattr(r.timings, f) for f in BATCHES})
            rec["ingress_hop_ms"] = rec["e2e_ms"] - r.timings.source_total_ms
            rec["correct"] = is_correct(r.answer, gold)
        except grpc.RpcError as err:
            rec.update(ok=False, code=err.code().name, details=err.details())
        rec["end"] = time.perf_counter()
        with lock:
            results.append(rec)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, tasks))
    return results


def summarize(records: list[dict], repeats: int) -> dict:
    ok = [r for r in records if r["ok"]]
    wall = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else float("nan")
    out = {"requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
           "requests_per_s": len(ok) / wall if wall else float("nan"), "modes": {}}
    groups = {}
    for r in ok:
        groups.setdefault((r["mode"], r["target"]), []).append(r)
    for (mode, target), rs in sorted(groups.items()):
        e2e = [r["e2e_ms"] for r in rs]
        stage = {f: statistics.mean(r[f] for r in rs) for f, _ in STAGES + [("ingress_hop_ms", "")]}
        wire = stage["packet_encode_ms"] + stage["packet_decode_ms"] + stage["bridge_hop_ms"] + \
            stage["target_hop_ms"] + stage["ingress_hop_ms"]
        out["modes"][f"{mode}/{target}"] = {
            "mode": mode, "target": target, "n": len(rs), "p50_ms": _pct(e2e, 50), "p95_ms": _pct(e2e, 95),
            "p99_ms": _pct(e2e, 99), "mean_ms": statistics.mean(e2e), "stages_mean_ms": stage,
            "grpc_and_codec_ms": wire, "grpc_and_codec_share": wire / statistics.mean(e2e),
            "bytes_per_request": statistics.mean(r["bytes"] for r in rs),
            "source_tokens": statistics.mean(r["source_tokens"] for r in rs),
            "message_tokens": statistics.mean(r["message_tokens"] for r in rs),
            "requests_per_s": len(rs) / wall if wall else float("nan"),
            # 0 where a mode skips the stage (no bridge for TEXT, no source forward for DIRECT)
            "batch_mean": {f: statistics.mean(r.get(f, 0) for r in rs) for f in BATCHES},
            "answers": [r["answer"] for r in rs[:3]],
            # share of replies that name the planted fact: a fast mode must still carry the fact
            "exact_match": (statistics.mean(r["correct"] for r in rs) if all("correct" in r for r in rs)
                            else float("nan"))}
    # LATENT vs TEXT speedup of p50, per repeat (items split into `repeats` rounds) -> spread; and
    # DIRECT vs TEXT: the target reading the context itself, the ceiling of a bridge that sends one
    # soft token per context token (LATENT = DIRECT + source states + bridge)
    for fast, slow in (("latent", "text"), ("direct", "text"), ("latent", "direct"), ("extract", "text")):
        for target, sp in _speedups(ok, fast, slow, repeats).items():
            out.setdefault(f"speedup_{fast}_vs_{slow}", {})[target] = sp
    # the budget's promise at the target: its own stage (prefill + decode) for a packet of at most M
    # soft tokens against reading the whole context (DIRECT)
    for key, m in out["modes"].items():
        direct = out["modes"].get(f"direct/{m['target']}")
        if m["mode"] != "direct" and direct:
            own = lambda x: x["stages_mean_ms"]["target_prefill_ms"] + x["stages_mean_ms"]["target_decode_ms"]  # noqa: E731
            m["target_stage_vs_direct"] = own(m) / own(direct) if own(direct) else float("nan")
    return out


def _speedups(ok: list[dict], fast: str, slow: str, repeats: int) -> dict[str, dict]:
    """Per target: p50 of `slow` over p50 of `fast`, overall and per repeat (with min and max)."""
    out = {}
    n_items = max((r["item"] for r in ok), default=-1) + 1
    for target in sorted({r["target"] for r in ok}):
        a_all = [r for r in ok if r["mode"] == fast and r["target"] == target]
        b_all = [r for r in ok if r["mode"] == slow and r["target"] == target]
        if not a_all or not b_all:
            continue
        ratios = []
        for k in range(repeats):
            chunk = set(range(k * n_items // repeats, (k + 1) * n_items // repeats))
            a = [r["e2e_ms"] for r in a_all if r["item"] in chunk]
            b = [r["e2e_ms"] for r in b_all if r["item"] in chunk]
            if a and b:
                ratios.append(statistics.median(b) / statistics.median(a))
        out[target] = {"p50_ratio": statistics.median([r["e2e_ms"] for r in b_all])
                       / statistics.median([r["e2e_ms"] for r in a_all]),
                       "per_repeat": ratios, "min": min(ratios, default=float("nan")),
                       "max": max(ratios, default=float("nan"))}
    return out


def plot(report: dict, path: str | Path) -> None:
    """The request workload's latency, stages and throughput; the session workload's per-turn p50 and
    KV cache by turn, per target (each part only when the report has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, sessions = report.get("settings", []), report.get("sessions", [])
    ncols = (3 if settings else 0) + (2 if sessions else 0)
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(6 * max(ncols, 1), 5.5), squeeze=False)
    axes = list(axes[0])
    if settings:
        _plot_requests(settings, axes[:3])
    if sessions:
        _plot_sessions(sessions, axes[-2:])
    hw = report["hardware"]
    fig.suptitle(f"LatentWire bench — {hw.get('gpu') or hw.get('cpu_model', hw['processor'])} "
                 f"({hw['cpus']} CPUs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_sessions(sessions: list[dict], axes) -> None:
    for s in sessions:
        for target, m in s["summary"]["targets"].items():
            label = f"{target}, {s['concurrency']} sessions, ctx {s['context_tokens']}"
            turns = range(1, len(m["turn_p50_ms_by_turn"]) + 1)
            axes[0].plot(turns, m["turn_p50_ms_by_turn"], marker="o", label=label)
            axes[1].plot(turns, m["kv_cache_tokens_by_turn"], marker="o", label=label)
    for ax, what in zip(axes, ["turn p50 ms", "KV cache entries (mean over sessions)"]):
        ax.set_xlabel("turn")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    axes[0].set_title("session turns: latency")
    axes[1].set_title("session turns: KV cache")


def _plot_requests(settings: list[dict], axes) -> None:
    base = [s for s in settings if s["concurrency"] == min(x["concurrency"] for x in settings)]
    labels, data = [], []
    for s in base:
        for key, m in s["summary"]["modes"].items():
            labels.append(f"{key} ctx {s['context_tokens']} EM {m['exact_match']:.2f}")
            data.append([r["e2e_ms"] for r in s["records"] if r["ok"] and f"{r['mode']}/{r['target']}" == key])
    axes[0].boxplot(data, showfliers=True)
    axes[0].set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=60, ha="right")
    axes[0].set_ylabel("end-to-end ms")
    axes[0].set_title(f"latency at concurrency {base[0]['concurrency'] if base else '?'}")
    bottoms = [0.0] * len(labels)
    i = 0
    names = [f for f, _ in STAGES] + ["ingress_hop_ms"]
    means = [m["stages_mean_ms"] for s in base for m in s["summary"]["modes"].values()]
    for f in names:
        vals = [m[f] for m in means]
        axes[1].bar(range(len(vals)), vals, bottom=bottoms, label=f.removesuffix("_ms"))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
        i += 1
    axes[1].set_xticks(range(len(labels)), labels, fontsize=7, rotation=60, ha="right")
    axes[1].set_ylabel("mean ms")
    axes[1].set_title("stage breakdown")
    axes[1].legend(fontsize=7)
    by_ctx = {}
    for s in settings:  # all modes share one mixed load, so throughput is per setting, not per mode
        by_ctx.setdefault(s["context_tokens"], []).append((s["concurrency"], s["summary"]["requests_per_s"]))
    for ctx, pts in sorted(by_ctx.items()):
        pts.sort()
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"context {ctx} tokens")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("concurrency")
    axes[2].set_ylabel("requests/s (all modes, interleaved)")
    axes[2].set_title("throughput")
    axes[2].legend(fontsize=8)


def table(report: dict) -> str:
    """The request workload's table, then the session workload's (each when the report has it)."""
    parts = [_request_table(report["settings"])] if report.get("settings") else []
    if report.get("sessions"):
        parts.append(session_table(report["sessions"]))
    return "\n\n".join(parts)


def session_table(sessions: list[dict]) -> str:
    rows = [["ctx", "sessions", "turns", "mode", "target", "turns ok", "turn p50", "turn p95", "KV last turn",
             "KV smaller", "turn p50 ratio", "replayed", "EM"]]
    for s in sessions:
        vs = s["summary"]["vs"]
        for target, m in s["summary"]["targets"].items():
            rows.append([str(s["context_tokens"]), str(s["concurrency"]), str(s["turns"]), s["mode"], target,
                         f"{m['turns_ok']}/{m['turns_planned']}", f"{m['turn_p50_ms']:.0f}",
                         f"{m['turn_p95_ms']:.0f}", f"{m['kv_cache_tokens_last_turn']:.0f}",
                         f"{m['kv_cache_smaller']:.2f}x vs {vs}", f"{m['turn_p50_ratio']:.2f}x vs {vs}",
                         str(m["replayed_turns"]), f"{m['exact_match']:.2f}"])
    return _align(rows, left={3, 4})


def _align(rows: list[list[str]], left: set[int]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) if i in left else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def _request_table(settings: list[dict]) -> str:
    rows = [["ctx", "conc", "mode/target", "n", "p50", "p95", "p99", "req/s", "grpc+codec %", "bytes",
             "batch src/brg/tgt", "EM"]]
    for s in settings:
        for key, m in s["summary"]["modes"].items():
            rows.append([str(s["context_tokens"]), str(s["concurrency"]), key, str(m["n"]), f"{m['p50_ms']:.0f}",
                         f"{m['p95_ms']:.0f}", f"{m['p99_ms']:.0f}", f"{m['requests_per_s']:.2f}",
                         f"{100 * m['grpc_and_codec_share']:.1f}", f"{m['bytes_per_request']:.0f}",
                         "/".join(f"{m['batch_mean'][f]:.1f}" for f in BATCHES), f"{m['exact_match']:.2f}"])
        for key in sorted(k for k in s["summary"] if k.startswith("speedup_")):
            fast, slow = key.removeprefix("speedup_").split("_vs_")
            for target, sp in s["summary"][key].items():
                rows.append([str(s["context_tokens"]), str(s["concurrency"]),
                             f"{fast.upper()} vs {slow.upper()} ({target})", "",
                             f"{sp['p50_ratio']:.2f}x", f"[{sp['min']:.2f}-{sp['max']:.2f}]", "", "", "", "", "", ""])
    return _align(rows, left={2})


def session_items(sessions: int, turns: int, context_tokens: int, seed: int = 0) -> list[list[BenchItem]]:
    """Per session, per turn: an item of `bench_items` (a context with one fact planted, and the
    question only that fact answers), none shared between sessions."""
    items = bench_items(sessions * turns, context_tokens, seed)
    return [items[k * turns:(k + 1) * turns] for k in range(sessions)]


def run_sessions(client, items: list[list[BenchItem]], targets: list[str], mode: str, max_new_tokens: int,
                 message_tokens: int) -> list[dict]:
    """Every session of `items` against every target, all at once, each session's turns in order.
    Turn t sends item t's context and asks its question, as turn t of the session. A turn that fails
    (after the client's retries) ends its session: a later turn would not follow."""
    run = uuid.uuid4().hex[:8]  # session ids unique to this run, on a deployment that may hold older ones
    jobs = [(k, target) for k in range(len(items)) for target in targets]
    results, lock = [], threading.Lock()

    def one(job):
        k, target = job
        sid = f"bench-{run}-{target or 'default'}-{k}"
        for t, it in enumerate(items[k]):
            req = client.request(it.context, it.question, mode, max_new_tokens=max_new_tokens, target_agent=target,
                                 message_tokens=message_tokens)
            req.session_id, req.session_turn = sid, t
            t0 = time.perf_counter()
            rec = {"session": k, "turn": t, "mode": mode, "target": target or "default", "start": t0}
            try:
                r = client.ask(request=req)
                rec.update(ok=True, e2e_ms=(time.perf_counter() - t0) * 1000, answer=r.answer,
                           answer_tokens=r.answer_tokens, kv_cache_tokens=r.kv_cache_tokens,
                           session_turns=r.session_turns, replayed_turns=r.replayed_turns,
                           message_tokens=r.message_tokens, target_prefill_ms=r.timings.target_prefill_ms,
                           target_decode_ms=r.timings.target_decode_ms, correct=is_correct(r.answer, it.answer))
            except grpc.RpcError as err:
                rec.update(ok=False, code=err.code().name, details=err.details())
            rec["end"] = time.perf_counter()
            with lock:
                results.append(rec)
            if not rec["ok"]:
                return

    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(one, jobs))
    return sorted(results, key=lambda r: (r["target"], r["session"], r["turn"]))


def summarize_sessions(records: list[dict], targets: list[str], sessions: int, turns: int) -> dict:
    """Per target: turns answered of those planned, per-turn latency (p50/p95 over every turn, and p50
    by turn), the KV cache by turn and at the last turn (mean over the sessions that reached it),
    exact match of each turn's own fact; and each target against the first: its KV cache at the last
    turn smaller by (first / this), its per-turn p50 as this / first."""
    names = [t or "default" for t in targets]
    out = {"vs": names[0], "targets": {}}
    wall = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else float("nan")
    out["wall_s"] = wall
    for name in names:
        ok = [r for r in records if r["target"] == name and r["ok"]]
        failed = [r for r in records if r["target"] == name and not r["ok"]]
        by_turn = [[r for r in ok if r["turn"] == t] for t in range(turns)]
        last = by_turn[-1] if by_turn else []
        e2e = [r["e2e_ms"] for r in ok]
        errors: dict[str, int] = {}
        for r in failed:
            errors[r["code"]] = errors.get(r["code"], 0) + 1
        out["targets"][name] = {
            "sessions": sessions, "turns": turns, "turns_planned": sessions * turns, "turns_ok": len(ok),
            "sessions_completed": len(last), "errors": errors,
            "turn_p50_ms": _pct(e2e, 50), "turn_p95_ms": _pct(e2e, 95),
            "turn_mean_ms": statistics.mean(e2e) if e2e else float("nan"),
            "turn_p50_ms_by_turn": [_pct([r["e2e_ms"] for r in rs], 50) for rs in by_turn],
            "kv_cache_tokens_by_turn": [statistics.mean(r["kv_cache_tokens"] for r in rs) if rs else float("nan")
                                        for rs in by_turn],
            "kv_cache_tokens_last_turn": statistics.mean(r["kv_cache_tokens"] for r in last) if last else float("nan"),
            "kv_cache_tokens_last_turn_max": max((r["kv_cache_tokens"] for r in last), default=0),
            "target_prefill_ms_mean": statistics.mean(r["target_prefill_ms"] for r in ok) if ok else float("nan"),
            "target_decode_ms_mean": statistics.mean(r["target_decode_ms"] for r in ok) if ok else float("nan"),
            "replayed_turns": sum(r["replayed_turns"] for r in ok),
            "exact_match": statistics.mean(r["correct"] for r in ok) if ok else float("nan"),
            "answers": [r["answer"] for r in ok[:3]]}
    base = out["targets"][names[0]]
    for m in out["targets"].values():
        m["kv_cache_smaller"] = (base["kv_cache_tokens_last_turn"] / m["kv_cache_tokens_last_turn"]
                                 if m["kv_cache_tokens_last_turn"] else float("nan"))
        m["turn_p50_ratio"] = m["turn_p50_ms"] / base["turn_p50_ms"] if base["turn_p50_ms"] else float("nan")
    return out


def run_bench(address: str, *, requests: int, concurrency: list[int], context_tokens: list[int],
              modes: list[str], targets: list[str], max_new_tokens: int, message_tokens: int, warmup: int,
              repeats: int, session_turns: int = 0, session_mode: str = "latent") -> dict:
    """The request workload (`requests` items per setting, every mode and target; none when 0) and,
    with `session_turns` > 0, the session workload: for each context size and concurrency K, K sessions
    of `session_turns` turns against every target at once (mode `session_mode`)."""
    from services.client import LatentWireClient

    report = {"hardware": hardware(), "address": address, "config": {
        "requests": requests, "concurrency": concurrency, "context_tokens": context_tokens, "modes": modes,
        "targets": targets, "max_new_tokens": max_new_tokens, "message_tokens": message_tokens,
        "warmup": warmup, "repeats": repeats, "session_turns": session_turns, "session_mode": session_mode},
        "settings": [], "sessions": []}
    with LatentWireClient(address, timeout_s=600) as client:
        for ctx in context_tokens if requests > 0 else []:
            items = bench_items(requests, ctx, seed=ctx)
            run_setting(client, bench_items(warmup, ctx, seed=ctx + 1), modes, 1, max_new_tokens, targets,
                        message_tokens)  # warm-up, discarded
            for conc in concurrency:
                recs = run_setting(client, items, modes, conc, max_new_tokens, targets, message_tokens)
                report["settings"].append({"context_tokens": ctx, "concurrency": conc,
                                           "summary": summarize(recs, repeats), "records": recs})
                print(f"ctx {ctx} concurrency {conc}: {len(recs)} requests, "
                      f"{report['settings'][-1]['summary']['requests_per_s']:.2f} req/s", flush=True)
        for ctx in context_tokens if session_turns > 0 else []:
            if warmup:  # one session of (at most) two turns per target, discarded
                run_sessions(client, session_items(1, min(2, session_turns), ctx, seed=ctx + 1), targets,
                             session_mode, max_new_tokens, message_tokens)
            for conc in concurrency:
                recs = run_sessions(client, session_items(conc, session_turns, ctx, seed=ctx), targets, session_mode,
                                    max_new_tokens, message_tokens)
                summary = summarize_sessions(recs, targets, conc, session_turns)
                report["sessions"].append({"context_tokens": ctx, "concurrency": conc, "turns": session_turns,
                                           "mode": session_mode, "summary": summary, "records": recs})
                print(f"ctx {ctx}: {conc} sessions x {session_turns} turns per target, "
                      f"{summary['wall_s']:.1f} s", flush=True)
    base = {(s["context_tokens"], s["concurrency"]): s["summary"] for s in report["settings"]}
    scaling = {}
    for ctx in context_tokens:
        c1, cmax = base.get((ctx, min(concurrency))), base.get((ctx, max(concurrency)))
        if c1 and cmax:
            scaling[str(ctx)] = {"requests_per_s_ratio": cmax["requests_per_s"] / c1["requests_per_s"],
                                 "from": min(concurrency), "to": max(concurrency)}
    report["throughput_scaling"] = scaling
    return report


def write(report: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1, default=float))
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(report, plot_path)
