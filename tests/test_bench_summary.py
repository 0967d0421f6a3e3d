"""The benchmark's summary arithmetic on known records: percentiles and the speedup agree."""

import statistics

from services import bench
from services.report import STAGES


def _record(item: int, mode: str, e2e: float, message_tokens: int) -> dict:
    return {"item": item, "mode": mode, "target": "default", "ok": True, "start": float(item), "end": item + 1.0,
            "e2e_ms": e2e, "bytes": 100, "source_tokens": 256, "message_tokens": message_tokens, "answer": "x",
            **{f: 1.0 for f, _ in STAGES}, "ingress_hop_ms": 1.0, "source_batch": 1, "bridge_batch": 1,
            "target_batch": 1}


def test_p50_is_the_median_the_speedup_divides_even_for_a_two_mode_sample():
    # TEXT as measured: half the messages stop early (~2.5 s), half use the full budget (~5.5 s)
    text = [2561, 2594, 5845, 2176, 5390, 5744, 2639, 6042]
    latent = [1397, 1692, 1565, 2039, 1370, 1748, 1591, 1546]
    records = [_record(i, "text", t, 13 if t < 3000 else 64) for i, t in enumerate(text)]
    records += [_record(i, "latent", t, 256) for i, t in enumerate(latent)]
    s = bench.summarize(records, repeats=2)
    t, lat = s["modes"]["text/default"], s["modes"]["latent/default"]
    assert t["p50_ms"] == statistics.median(text) == (2639 + 5390) / 2
    assert lat["p50_ms"] == statistics.median(latent)
    assert s["speedup_latent_vs_text"]["default"]["p50_ratio"] == t["p50_ms"] / lat["p50_ms"]
    assert t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= max(text)
    assert len(s["speedup_latent_vs_text"]["default"]["per_repeat"]) == 2
    assert "speedup_direct_vs_text" not in s  # no DIRECT records: no DIRECT ratio


def test_direct_vs_text_is_reported_beside_latent_vs_text_per_repeat():
    """DIRECT vs TEXT, the ceiling of a bridge that sends one soft token per context token, is the
    same p50 ratio with the same per-repeat spread."""
    text = [6000, 5000, 7000, 4000]
    direct = [2000, 2500, 1000, 2000]
    records = [_record(i, "text", t, 40) for i, t in enumerate(text)]
    records += [_record(i, "direct", t, 0) for i, t in enumerate(direct)]
    records += [_record(i, "latent", t + 100, 900) for i, t in enumerate(direct)]
    s = bench.summarize(records, repeats=2)
    d = s["speedup_direct_vs_text"]["default"]
    assert d["p50_ratio"] == statistics.median(text) / statistics.median(direct)
    assert d["per_repeat"] == [5500 / 2250, 5500 / 1500] and d["min"] < d["max"]
    assert s["speedup_latent_vs_text"]["default"]["p50_ratio"] < d["p50_ratio"]
    table = bench.table({"settings": [{"context_tokens": 1024, "concurrency": 1, "summary": s}]})
    assert "DIRECT vs TEXT (default)" in table and f"{d['p50_ratio']:.2f}x" in table


def test_latent_against_direct_and_the_target_stage_share_are_reported():
    """The budget's goals: LATENT's p50 against DIRECT's, and the target's own stage time for a packet
    of M soft tokens against reading the whole context."""
    records = [_record(i, "direct", 4000.0, 0) for i in range(4)] + [_record(i, "latent", 1000.0, 64) for i in range(4)]
    for r in records:
        r["target_prefill_ms"] = 3000.0 if r["mode"] == "direct" else 300.0
    s = bench.summarize(records, repeats=2)
    assert s["speedup_latent_vs_direct"]["default"]["p50_ratio"] == 4.0
    assert s["modes"]["latent/default"]["target_stage_vs_direct"] == (300.0 + 1.0) / (3000.0 + 1.0)
    assert "target_stage_vs_direct" not in s["modes"]["direct/default"]
    table = bench.table({"settings": [{"context_tokens": 4096, "concurrency": 1, "summary": s}]})
    assert "LATENT vs DIRECT (default)" in table and "4.00x" in table


def test_percentiles_of_tiny_samples():
    assert bench._pct([], 50) != bench._pct([], 50)  # nan
    assert bench._pct([7.0], 99) == 7.0
    assert bench._pct([1.0, 3.0], 50) == 2.0


def test_exact_match_is_the_share_of_replies_that_name_the_planted_fact():
    records = [_record(i, "latent", 1000.0, 256) for i in range(4)]
    for r, ok in zip(records, [True, False, True, True]):
        r["correct"] = ok
    assert bench.summarize(records, repeats=1)["modes"]["latent/default"]["exact_match"] == 0.75
    # records without a verdict (an older report) give nan, not a made-up score
    em = bench.summarize([_record(0, "text", 1.0, 8)], repeats=1)["modes"]["text/default"]["exact_match"]
    assert em != em


def test_bench_items_plant_their_answer_and_keep_the_old_items():
    items = bench.bench_items(9, 256, seed=256)
    for it in items:
        assert it.context.count(it.answer) >= 1 and it.question.endswith("?")
        assert bench.is_correct(f"It is {it.answer.upper()}.", it.answer)
    assert {it.question for it in items} == {q for _, q in bench.FACTS}
    assert bench.make_items(9, 256, seed=256) == [(it.context, it.question) for it in items]
    assert not bench.is_correct("Nobody.", items[0].answer)


def _turn(target: str, session: int, turn: int, e2e: float, kv: int, ok: bool = True) -> dict:
    rec = {"target": target, "session": session, "turn": turn, "mode": "latent", "ok": ok, "start": float(turn),
           "end": turn + 1.0}
    if ok:
        rec.update(e2e_ms=e2e, kv_cache_tokens=kv, answer="x", correct=turn % 2 == 0, replayed_turns=0,
                   target_prefill_ms=1.0, target_decode_ms=2.0)
    else:
        rec.update(code="UNAVAILABLE", details="no replica")
    return rec


def test_session_summary_puts_targets_side_by_side_and_counts_a_session_cut_short():
    """Per target: turns answered of those planned, p50 over every turn and by turn, the KV cache at the
    last turn (mean over the sessions that reached it); against the first target, its cache over this
    one's and this p50 over its p50. A failed turn ends its session (no later turn of it is sent)."""
    records = [_turn("default", k, t, 100.0 * (t + 1), 100 * (t + 1) + k) for k in range(2) for t in range(3)]
    records += [_turn("fmkvc", 0, t, 50.0 * (t + 1), 30 * (t + 1)) for t in range(3)]
    records += [_turn("fmkvc", 1, 0, 50.0, 30), _turn("fmkvc", 1, 1, 0.0, 0, ok=False)]
    s = bench.summarize_sessions(records, ["", "fmkvc"], sessions=2, turns=3)
    d, f = s["targets"]["default"], s["targets"]["fmkvc"]
    assert s["vs"] == "default" and s["wall_s"] == 3.0
    assert (d["turns_ok"], d["turns_planned"], d["sessions_completed"], d["errors"]) == (6, 6, 2, {})
    assert (f["turns_ok"], f["turns_planned"], f["sessions_completed"], f["errors"]) == (4, 6, 1, {"UNAVAILABLE": 1})
    assert d["turn_p50_ms_by_turn"] == [100.0, 200.0, 300.0] and d["turn_p50_ms"] == 200.0
    assert d["kv_cache_tokens_by_turn"] == [100.5, 200.5, 300.5] and d["kv_cache_tokens_last_turn"] == 300.5
    assert f["kv_cache_tokens_last_turn"] == 90 and f["kv_cache_tokens_last_turn_max"] == 90
    assert f["kv_cache_smaller"] == 300.5 / 90 and d["kv_cache_smaller"] == 1.0
    assert f["turn_p50_ms"] == 75.0 and f["turn_p50_ratio"] == 75.0 / 200.0  # turns of 50, 100, 150 and 50 ms
    assert d["exact_match"] == 4 / 6
    table = bench.session_table([{"context_tokens": 256, "concurrency": 2, "turns": 3, "mode": "latent",
                                  "summary": s}])
    assert "4/6" in table and f"{300.5 / 90:.2f}x vs default" in table
    assert bench.table({"settings": [], "sessions": [{"context_tokens": 256, "concurrency": 2, "turns": 3,
                                                      "mode": "latent", "summary": s}]}) == table
