"""Compressed session memory (compression/session.py) and `latentwire eval-session`, on the tiny models.

A session whose cache is compressed (a window method or a kvpress scorer press) passes its budget:
its cache stays within the budget's entries while the dense session's grows with every token, it
holds fewer bytes, and every turn still gets an answer. eval-session's CLI runs end to end and
writes the JSON and the figure.
"""

from __future__ import annotations

import json

import pytest

from compression.cache import cache_nbytes
from compression.session import PrunedCache, factory
from latentwire.runtime import AgentModel
from latentwire.sessions import SessionCaches
from latentwire.settings import SessionLimits

RECORD = "Vera has an apartment in Quito. The module parses command lines and writes usage messages."
QUESTION = "In what city is Vera's home?"
RATIO, SINK, RECENT = 4, 2, 16


def run_turns(agent, n: int):
    store = SessionCaches(SessionLimits(max_tokens=1 << 20))
    out = []
    for t in range(n):
        gen, s = store.answer(agent, "s", t, f"{RECORD} Turn {t}.", QUESTION, 3)
        out.append((gen, s.tokens, cache_nbytes(s.state), s.state))
    return out


@pytest.mark.parametrize("profile,method", [("tiny-mistral", "mean_pool"), ("tiny-llama", "snapkv"),
                                            ("tiny-llama", "knorm"), ("tiny-llama", "streamingllm"),
                                            ("tiny-mistral", "mean_pool:keep=1")])
def test_a_compressed_session_stays_within_its_budget_and_still_answers(profile, method):
    dense = AgentModel(profile)
    dense.eos_ids = set()  # random weights: every answer runs its 3 tokens
    name, _, keep = method.partition(":keep=")
    keep = int(keep or 0)  # the hybrid: keep exact entries per window of RATIO x (keep + 1), the same budget
    compressed = AgentModel(profile, model=dense.model, tokenizer=dense.tok,
                            cache_factory=factory(method=name, profile=profile, window=RATIO * (keep + 1), sink=SINK,
                                                  recent=RECENT, keep=keep))
    compressed.eos_ids = set()
    d, c = run_turns(dense, 6), run_turns(compressed, 6)
    seen = c[-1][3].get_seq_length()
    assert seen == d[-1][1] > 4 * (SINK + RATIO + RECENT)  # the same tokens read, well past the budget
    for (gd, dense_entries, dense_bytes, _), (gc, entries, nbytes, cache) in zip(d, c):
        assert len(gc.token_ids) == 3 and gc.text  # an answer every turn
        budget = SINK + (cache.get_seq_length() - SINK - RECENT) // RATIO + RECENT + RATIO * (keep + 1)
        turn = 4 + 1  # a pruned cache reaches its budget at the prompt; the answer and its end come after
        assert entries <= budget + turn, (entries, budget)
        assert nbytes < dense_bytes
    assert d[-1][2] / c[-1][2] > 2.5  # about RATIO x fewer bytes at the end
    if name != "mean_pool":
        assert isinstance(c[-1][3], PrunedCache) and c[-1][3].pruned > 0


def test_a_press_that_is_not_a_scorer_is_refused():
    with pytest.raises(ValueError, match="not a kvpress scorer press"):
        factory(method="kvzip", profile="tiny-llama", window=4)


def test_eval_session_cli_writes_json_and_plot(tmp_path, capsys):
    from latentwire.cli import main

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    methods = "dense,mean_pool,knorm,mean_pool:keep=1,mean_pool:keep=1:select=reconstruction"
    rc = main(["eval-session", "--model", "tiny-llama", "--methods", methods, "--sessions", "1",
               "--turns", "3", "--ratio", "4", "--sink", "2", "--recent", "16", "--filler-tokens", "8",
               "--max-new-tokens", "2", "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"dense", "mean_pool", "knorm", "mean_pool:keep=1",
                                  "mean_pool:keep=1:select=reconstruction"} and res["errors"] == {}
    for m in res["methods"].values():
        assert m["n"] == 3 and len(m["by_turn"]) == 3 and 0 <= m["recall"] <= 1
        assert m["probe_recall"]["n"] == 0  # probes start after the 4th turn
    assert res["methods"]["knorm"]["kv_reduction"] > 1 and res["methods"]["mean_pool"]["kv_reduction"] > 1
    assert json.loads(capsys.readouterr().out)["json"] == str(out)


def test_eval_session_refuses_an_unknown_method(capsys):
    from latentwire.cli import main

    assert main(["eval-session", "--methods", "dense,nope", "--json", "/dev/null"]) == 2
    assert "unknown KV compression method 'nope'" in capsys.readouterr().err
    assert main(["eval-session", "--methods", "dense,fmkvc:keep=x", "--json", "/dev/null"]) == 2
    assert "options are keep=N, sliding_layers=pool|newest and select=window|reconstruction, not 'keep=x'" in capsys.readouterr().err


def test_probes_ask_earlier_records_on_a_copy_of_the_session_cache():
    """A probe is answered from a fork of the session's cache that is then dropped: the session's cache
    after the run equals (length, entries, values) a run without probes, and every probe asks a record
    delivered before it, the first one of the first four."""
    import torch

    from compression.session_eval import EARLY, SessionEvalConfig, conversations, run_session

    cfg = SessionEvalConfig(model="tiny-llama", sessions=1, turns=6, filler_tokens=8, max_new_tokens=2, probes=2)
    turns = conversations(cfg)[0]
    assert [t["asked"] for t in turns] == list(range(6))  # asks="current": each turn its own record
    for t, turn in enumerate(turns):
        assert len(turn["probes"]) == (2 if t >= EARLY else 0)
        for k, p in enumerate(turn["probes"]):
            assert p["asked"] < (EARLY if k == 0 else t) and p["distance"] == t - p["asked"]
    agent = AgentModel("tiny-mistral", cache_factory=factory(method="mean_pool", profile="tiny-mistral", window=4,
                                                             sink=2, recent=8))
    agent.eos_ids = set()
    caches = []
    for probes in (2, 0):
        store_rows = run_session(agent, [dict(t, probes=t["probes"] if probes else []) for t in turns], cfg, "s")
        caches.append(store_rows)
    with_probes, without = caches
    assert sum(len(r["probes"]) for r in with_probes) == 4 and all(not r["probes"] for r in without)
    for a, b in zip(with_probes, without):
        assert (a["answer"], a["kv_bytes"], a["tokens"]) == (b["answer"], b["kv_bytes"], b["tokens"])


@pytest.mark.parametrize("method", ["mean_pool:keep=1", "knorm"])
def test_a_turn_is_held_exact_while_it_is_answered_and_compressed_after(method):
    """begin_turn/end_turn (SessionCaches.answer calls them): while a turn is read and decoded nothing of
    it is compressed, so the answer is written over the whole turn; once it ends the cache is back
    within the budget, and the next turn starts from there."""
    import torch

    name, _, keep = method.partition(":keep=")
    keep = int(keep or 0)
    agent = AgentModel("tiny-llama", cache_factory=factory(method=name, profile="tiny-llama",
                                                           window=RATIO * (keep + 1), sink=SINK, recent=RECENT,
                                                           keep=keep))
    cache = agent.new_cache()
    lengths = []
    for turn in range(3):
        ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(turn))
        before = max(cache.kv_lengths())
        cache.begin_turn()
        with torch.no_grad():
            agent.model(ids, past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(cache.get_seq_length(), cache.get_seq_length() + 60)[None])
            for t in range(5):  # decode steps
                agent.model(ids[:, t:t + 1], past_key_values=cache, use_cache=True,
                            position_ids=torch.tensor([[cache.get_seq_length()]]))
        assert cache.kv_lengths() == [before + 65] * len(cache.layers)  # all of the turn held, nothing pooled
        cache.end_turn()
        seen = cache.get_seq_length()
        budget = SINK + (seen - SINK - RECENT) // RATIO + RECENT + RATIO * (keep + 1)
        lengths.append(max(cache.kv_lengths()))
        assert lengths[-1] <= budget and lengths[-1] < seen
    assert lengths[0] < lengths[1] < lengths[2] < 3 * 65  # grows by about a turn / ratio
