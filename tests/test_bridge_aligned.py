"""The aligned bridge: context-token packets, the ridge fit, the vocabulary projection, the weights
and its Ray Train job (tiny pair, real local Ray cluster, 2 CPU workers)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bridge.align import AlignConfig, candidate_vocab, moments, piece_targets, solve
from bridge.aligned import AlignedBridge, AlignedConfig, vocab_digest
from tests.conftest import tiny_aligned_bridge



def _bridge(d_src=6, d_tgt=4, vocab=None, temperature=0.01):
    vocab = torch.randn(10, d_tgt) if vocab is None else vocab
    cfg = AlignedConfig("a", "b", 2, d_src, d_tgt, temperature=temperature, embed_rms=1.0,
                        vocab_digest=vocab_digest(vocab))
    return AlignedBridge(cfg, torch.arange(len(vocab)), vocab).eval()


def test_the_packet_is_the_context_tokens(tiny_source):
    ctx, q = "Alice lives in Oslo and drives a red car.", "Which city does Alice live in?"
    ids, span = tiny_source.source_prompt(ctx, q)
    assert torch.equal(ids, tiny_source.source_ids(ctx, q))
    assert tiny_source.tok.decode(ids[span]).strip() == ctx
    assert 0 < span.start and span.stop < len(ids)  # the template and question are left out
    # an empty context has no tokens of its own: the whole prompt goes, never an empty packet
    ids, span = tiny_source.source_prompt("", q)
    assert (span.start, span.stop) == (0, len(ids))


def test_ridge_solve_recovers_a_linear_map():
    torch.manual_seed(0)
    x = torch.randn(500, 6) * torch.tensor([1.0, 5, 0.1, 2, 3, 1]) + torch.tensor([3.0, -1, 0, 2, 0, 7])
    w, b = torch.randn(6, 4), torch.randn(4)
    y = x @ w + b
    S, B = moments(x, y)
    bridge = _bridge()
    bridge.load_state_dict({**solve(S, B, ridge=0.0), "vocab_ids": bridge.vocab_ids})
    torch.testing.assert_close(bridge.mapped(x), y, atol=1e-3, rtol=1e-3)
    # moments add up: two halves give the same sums as the whole (what the workers all-reduce)
    S1, B1 = moments(x[:200], y[:200])
    S2, B2 = moments(x[200:], y[200:])
    torch.testing.assert_close(S1 + S2, S)
    torch.testing.assert_close(B1 + B2, B)


def test_projection_is_a_convex_mix_of_the_vocabulary_and_sharpens_to_the_nearest_row():
    torch.manual_seed(0)
    vocab = torch.randn(10, 4)
    sharp, soft = _bridge(vocab=vocab, temperature=1e-4), _bridge(vocab=vocab, temperature=10.0)
    x = vocab[[3, 7, 7]] + 0.05 * torch.randn(3, 4)
    out, peak = sharp.project(x)
    torch.testing.assert_close(out, vocab[[3, 7, 7]], atol=1e-4, rtol=0)
    assert (peak > 0.999).all()
    out, peak = soft.project(x)
    assert (peak < 0.5).all()  # a real mixture, not a codebook lookup
    lo, hi = vocab.min(0).values, vocab.max(0).values
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()  # inside the vocabulary's hull


def test_padding_rows_do_not_change_the_soft_tokens():
    b = _bridge()
    h = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = b(h, mask)
        single = b(h[:1, :3])
    torch.testing.assert_close(batched[0, :3], single[0])
    assert torch.equal(batched[0, 3:], torch.zeros(2, 4))


def test_weights_round_trip_and_refuse_other_target_embeddings(tmp_path):
    from latentwire.weights import WeightsError

    vocab = torch.randn(10, 4)
    b = _bridge(vocab=vocab)
    torch.nn.init.normal_(b.proj.weight)
    b.save(tmp_path / "b.safetensors")
    x = torch.randn(1, 3, 6)
    loaded = AlignedBridge.load(tmp_path / "b.safetensors", embeddings=vocab)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), b(x))
    assert loaded.sha256 == json.loads((tmp_path / "b.json").read_text())["sha256"]
    with pytest.raises(ValueError, match="vocabulary digest"):
        AlignedBridge.load(tmp_path / "b.safetensors", embeddings=vocab + 0.1)
    with pytest.raises(ValueError, match="does not fit"):
        AlignedBridge.load(tmp_path / "b.safetensors", embeddings=torch.randn(10, 5))
    raw = bytearray((tmp_path / "b.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "b.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError):
        AlignedBridge.load(tmp_path / "b.safetensors", embeddings=vocab)


def test_piece_targets_are_the_targets_own_embeddings(tiny_source, tiny_target):
    text = "Alice lives in Oslo."
    ids, pos, tids, y = piece_targets(tiny_source, tiny_target, text)
    assert len(pos) == len(ids)  # every source token has a target here
    one = tids >= 0
    assert one.any()
    with torch.no_grad():
        torch.testing.assert_close(y[one], tiny_target.embed(tids[one][None])[0].float())
    for i in pos[one].tolist()[:5]:  # the target token spells the same piece of text
        j = int(tids[pos.tolist().index(i)])
        assert tiny_target.tok.decode([j]) == tiny_source.tok.decode([int(ids[i])])
    assert set(tids[one].tolist()) <= set(candidate_vocab(tiny_source, tiny_target).tolist())



def test_fit_job_recovers_from_a_worker_failure_and_resumes_to_the_same_bridge(ray_cluster, tmp_path):
    from bridge.align import run
    from latentwire.weights import sha256_file

    cfg = AlignConfig(source="tiny-llama", target="tiny-mistral", train_items=12, corpus_chunks=6,
                      vocab_sequences=2, chunk_units=5, val_items=2, num_workers=2, max_failures=1,
                      fail_at_chunk=2, storage_path=str(tmp_path / "ray"), name="fit",
                      out=str(tmp_path / "aligned.safetensors"))
    first = run(cfg)
    ckpt = Path(first["checkpoint"])
    man = json.loads((ckpt / "bridge.json").read_text())
    assert man["sha256"] == sha256_file(ckpt / "bridge.safetensors")
    m = first["final_metrics"]
    assert m["chunks"] == 4 and m["rows"] > 0 and 0 <= m["val_answer_token_acc"] <= 1 and "val_em" in m
    # a worker raised in chunk 2; FailureConfig restarted the group from the chunk-1 checkpoint and
    # the sums were not counted twice: a clean run gives the same rows and the same weights
    clean = run(replace(cfg, fail_at_chunk=None, name="clean", out=None))
    assert clean["final_metrics"]["rows"] == m["rows"]
    a = AlignedBridge.load(cfg.out, embeddings=_tiny_embeddings())
    b = AlignedBridge.load(Path(clean["checkpoint"]) / "bridge.safetensors", embeddings=_tiny_embeddings())
    torch.testing.assert_close(a.proj.weight, b.proj.weight, atol=1e-5, rtol=1e-4)
    # --resume from a mid-run checkpoint ends at the same bridge too
    mid = sorted((tmp_path / "ray" / "clean").glob("checkpoint_*"))[0]
    resumed = run(replace(cfg, fail_at_chunk=None, name="resumed", out=None, resume=str(mid)))
    assert resumed["final_metrics"]["rows"] == m["rows"]
    c = AlignedBridge.load(Path(resumed["checkpoint"]) / "bridge.safetensors", embeddings=_tiny_embeddings())
    torch.testing.assert_close(c.proj.weight, b.proj.weight, atol=1e-5, rtol=1e-4)


def _tiny_embeddings():
    from latentwire.profiles import input_embeddings

    return input_embeddings("tiny-mistral")


def test_bridge_service_trims_each_packet_to_its_own_rows(tmp_path, tiny_source, tiny_target):
    from services.bridge_service import BridgeServicer

    bridge = tiny_aligned_bridge(tiny_source, tiny_target)
    bridge.save(tmp_path / "aligned.safetensors")
    svc = BridgeServicer(dict(weights=str(tmp_path / "aligned.safetensors"), threads=1))
    hiddens = [torch.randn(t, tiny_source.hidden_size) for t in (5, 9, 1)]
    batched = svc.translate_many(hiddens)
    assert [tuple(b.shape) for b in batched] == [(t, tiny_target.hidden_size) for t in (5, 9, 1)]
    with torch.no_grad():
        for b, h in zip(batched, hiddens):
            torch.testing.assert_close(b, svc.bridge(h[None])[0], atol=1e-5, rtol=1e-4)


def test_keeping_the_nearest_rows_changes_nothing_at_a_low_temperature():
    """The top-k softmax equals the softmax over the whole vocabulary when the rest weigh nothing."""
    torch.manual_seed(0)
    vocab = torch.randn(200, 4)
    full, kept = _bridge(vocab=vocab, temperature=0.01), _bridge(vocab=vocab, temperature=0.01)
    full.cfg.top_k, kept.cfg.top_k = 200, 8
    x = torch.randn(50, 4)
    a, pa = full.project(x)
    b, pb = kept.project(x)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)  # the dropped rows' weight, below bf16's step
    torch.testing.assert_close(pa, pb, atol=2e-4, rtol=1e-3)


def test_bfloat16_search_picks_the_rows_float32_does_and_mixes_them_in_float32():
    """Serving may score the vocabulary in bfloat16 (search_dtype); only the choice of rows is made
    there: distances, weights and the mix are float32, so the soft tokens match the float32 search."""
    torch.manual_seed(0)
    vocab = torch.randn(300, 16)
    exact, fast = _bridge(d_tgt=16, vocab=vocab), _bridge(d_tgt=16, vocab=vocab).use_search_dtype("bfloat16")
    exact.cfg.top_k = fast.cfg.top_k = 8
    x = vocab[torch.randint(0, 300, (64,))] + 0.3 * torch.randn(64, 16)
    d_exact, i_exact = exact.nearest(x, 8)
    d_fast, i_fast = fast.nearest(x, 8)
    assert torch.equal(i_fast[:, 0], i_exact[:, 0])  # the nearest row is found
    assert (d_fast[:, 1:] >= d_fast[:, :-1]).all()  # nearest first
    true = (x[:, None] - vocab[i_fast]).pow(2).sum(-1)
    torch.testing.assert_close(d_fast, true, atol=1e-4, rtol=1e-5)  # float32 distances, not bf16's
    assert fast.project(x)[0].dtype == torch.float32
    torch.testing.assert_close(fast.project(x)[0], exact.project(x)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="search dtype"):
        exact.use_search_dtype("float16")
    # auto is bfloat16 only where it is fast, and never changes the float32 default of a new bridge
    auto = _bridge(d_tgt=16, vocab=vocab).use_search_dtype("auto")
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    assert auto.search_dtype == (torch.bfloat16 if amx else torch.float32)
    assert _bridge().search_dtype == torch.float32


def test_a_token_index_searches_few_rows_and_gives_the_full_search_soft_tokens(tmp_path, tiny_source, tiny_target):
    """bridge/token_index.py: the rows each source token picked on calibration text; with as many
    recorded per occurrence as the softmax keeps (top_k), the same texts get the same soft tokens
    from the short lists; a token the index does not list is searched in the whole vocabulary;
    an index is refused by any other bridge."""
    from bridge import token_index as ti
    from bridge.load import load_bridge
    from services.bridge_service import BridgeServicer

    bridge = tiny_aligned_bridge(tiny_source, tiny_target)
    bridge.cfg.top_k = 4
    bridge.save(tmp_path / "aligned.safetensors")
    bridge = load_bridge(tmp_path / "aligned.safetensors")  # with its sha
    texts = ["the cat sat on the mat", "a dog ran to the park and sat"]
    offsets, rows, stats = ti.build(bridge, tiny_source, texts, per_row=4, progress=False)
    assert stats["mean_candidates"] < bridge.vocab.shape[0] / 4  # short lists, not the vocabulary
    ti.save(ti.default_path(tmp_path / "aligned.safetensors"), offsets, rows, bridge, data=stats)

    svc = BridgeServicer(dict(weights=str(tmp_path / "aligned.safetensors"), threads=1))  # token_index: auto
    assert svc.bridge.token_index is not None
    from latentwire.codec import wire
    with torch.no_grad():
        for text in texts + ["an unseen zebra"]:  # the last: tokens the index does not list
            ids = tiny_source.tokenize(text)
            h = wire(tiny_source.hidden_states(ids, 2).float(), "bfloat16")
            listed = svc.translate_many([h], [ids])[0]
            full = svc.translate_many([h])[0]  # no ids: the whole vocabulary
            torch.testing.assert_close(listed, full, atol=1e-5, rtol=1e-4)
    assert bool((offsets[tiny_source.tokenize("zebra") + 1] == offsets[tiny_source.tokenize("zebra")]).any())

    other = load_bridge(tmp_path / "aligned.safetensors")
    other.sha256 = "0" * 64
    with pytest.raises(ValueError, match="built for bridge"):
        ti.load(ti.default_path(tmp_path / "aligned.safetensors"), other)


def test_the_lexicon_brings_a_tokens_own_row_first_and_touches_nothing_else(tmp_path):
    """AlignedBridge.set_lexicon: a soft token whose source token is listed mixes its own row at the
    prior distance, whether or not the search found that row; other tokens, and packets without
    source token ids, get the bit-identical soft tokens of a bridge without a lexicon."""
    torch.manual_seed(0)
    vocab = torch.randn(10, 4)
    plain, b = _bridge(vocab=vocab), _bridge(vocab=vocab)
    b.cfg.top_k = plain.cfg.top_k = 3
    x = vocab[[1, 1, 2, 5]] + 0.01 * torch.randn(4, 4)  # nearest rows 1, 1, 2, 5
    ids = torch.tensor([7, 8, 9, 30])  # source tokens: 7 should read row 6, 8 row 1 (already nearest)
    unit = b.cfg.temperature * b.cfg.d_tgt
    far = float((x[0] - vocab[6]).pow(2).sum() - (x[0] - vocab[1]).pow(2).sum())
    b.set_lexicon(torch.tensor([7, 8]), torch.tensor([6, 1]), torch.tensor([far + 4 * unit, 4 * unit]))
    with torch.no_grad():
        out, peak = b.project(x, ids)
        ref, ref_peak = plain.project(x, ids)
        assert b.nearest(out, 1)[1][0, 0] == 6 and peak[0] > 0.95  # row 6 was not among the 3 candidates
        assert b.nearest(out, 1)[1][1, 0] == 1 and peak[1] >= ref_peak[1]
        assert torch.equal(out[2:], ref[2:])  # unlisted tokens (9, and 30 past the table) unchanged
        assert torch.equal(b.project(x)[0], ref)  # no ids: no lexicon
    b.save(tmp_path / "lex.safetensors")
    loaded = AlignedBridge.load(tmp_path / "lex.safetensors", embeddings=vocab)
    assert {k: v.tolist() for k, v in loaded.lexicon().items()} == {k: v.tolist() for k, v in b.lexicon().items()}
    with torch.no_grad():
        assert torch.equal(loaded.project(x, ids)[0], out)


def test_fit_lexicon_lists_only_tokens_the_map_sends_elsewhere(tiny_source, tiny_target):
    from bridge.align import fit_lexicon, own_gap, own_rows, token_states, LEXICON_PREFIXES

    bridge = tiny_aligned_bridge(tiny_source, tiny_target)
    stats = fit_lexicon(bridge, tiny_source, tiny_target, slack=4.0)
    # a random map sends most tokens elsewhere; the prior brings 9 in 10 back, in a context it was not fitted in
    assert stats["held_out_own_row_before"] < 0.5 and stats["held_out_own_row_after"] > 0.9
    own = own_rows(bridge, tiny_source, tiny_target)
    listed = bridge.lexicon()["lexicon_tokens"]
    assert 0 < len(listed) == stats["lexicon_tokens"] and bool((own[listed] >= 0).all())
    assert torch.equal(bridge.lexicon()["lexicon_rows"], own[listed])
    right = own_gap(bridge, token_states(bridge, tiny_source, listed[:50], LEXICON_PREFIXES[0]), own[listed[:50]])
    unit = bridge.cfg.temperature * bridge.cfg.d_tgt * bridge.cfg.embed_rms ** 2
    assert bool((bridge.lexicon()["lexicon_margin"][:50] >= right + 4 * unit - 1e-3).all())


def test_the_lexicon_adds_its_row_to_short_index_lists_without_dropping_a_candidate():
    """With a token index, a soft token mixes only its listed rows (fewer than top_k); a listed
    lexicon row joins them in a free slot, so the result is the softmax over listed rows + own row,
    in every row of a packet whose tokens are partly listed, partly searched in the whole vocabulary."""
    torch.manual_seed(1)
    vocab = torch.randn(10, 4)
    b = _bridge(vocab=vocab, temperature=0.5)  # warm: every candidate weighs
    b.cfg.top_k = 4
    # source token 0 lists rows {2, 3}; token 1 lists {4}; token 2 lists nothing (whole vocabulary)
    b.use_token_index(torch.tensor([0, 2, 3, 3]), torch.tensor([2, 3, 4]))
    b.set_lexicon(torch.tensor([0]), torch.tensor([7]), torch.tensor([0.3]))
    x = torch.randn(3, 4)
    ids = torch.tensor([0, 1, 2])

    def mix(row, cands, prior=None):
        d2 = (x[row] - vocab[cands]).pow(2).sum(-1)
        if prior is not None:
            d2[-1] -= prior
        p = torch.softmax(-d2 / b.softmax_scale, -1)
        return p @ vocab[cands]

    with torch.no_grad():
        out, _ = b.project(x, ids)
        torch.testing.assert_close(out[0], mix(0, [2, 3, 7], prior=0.3))  # listed rows kept, own row added
        torch.testing.assert_close(out[1], mix(1, [4]))
        whole = (x[2] - vocab).pow(2).sum(-1).topk(4, largest=False).indices
        torch.testing.assert_close(out[2], mix(2, whole.tolist()))
        listed_only, _ = b.project(x[:2], ids[:2])  # every token listed: as many columns as the longest list
        torch.testing.assert_close(listed_only, out[:2])
