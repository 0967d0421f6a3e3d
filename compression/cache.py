"""A transformers `Cache` that keeps coarse-graining itself as it grows (prefill AND decode).

Layout of every layer's cache, oldest first:

    [ sink tokens (dense) | one super-token per full window of W older tokens | recent tokens (dense) ]

(with `Schedule.keep` = k > 0, each window leaves its k most important entries exact before its
super-token, which pools the other W - k: the hybrid memory, W / (k + 1) times smaller.)

After each update, while the dense tail holds at least `W + recent` tokens, its oldest W tokens are
replaced by one super-token from a compressor (the FMKVC sidecar, or mean pooling). So after T tokens
a layer holds `sink + m + r` entries with m = (T - sink - recent) // W and recent <= r < recent + W.

Positions: cached keys are post-RoPE, so super-tokens need no position of their own. What must stay
right is the bookkeeping around them: `get_seq_length()` returns the number of tokens *seen* (like
transformers' sliding-window layers do), so `cache_position`, default `position_ids` and
`model.generate` keep counting true positions, while `get_mask_sizes` reports the *stored* length
with an offset that places the stored entries right before the new tokens. A 2-D attention mask of
length `get_seq_length() + q` (what `AgentModel.generate` and `model.generate` pass) then lines up.

Sliding-window layers (Gemma 3, Mistral): the dense model never sees tokens older than the window, so
entries whose newest token left the window are evicted; the rest is compressed as above.

Attention mass: a compressor marked `proportional` (the FMKVC sidecar) makes each super-token count as
the W tokens it replaces: the layer keeps every entry's log-count and publishes it to
`compression.attention` before each attention call, which adds it to the scores. That needs the model
switched to `compression.attention.NAME` (`cache_factory` does it; `FMKVCCache` checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
import math

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from compression import attention
from compression.base import SLIDING_LAYERS, Compressor, Schedule, build, check_select
from compression.refine import refine_super_tokens

def proportional(compressor: Compressor | None) -> bool:
    """Whether the compressor's super-tokens carry the attention mass of their W tokens."""
    return compressor is not None and compressor.proportional()


def merge_log_count(log_count: torch.Tensor, start: int, m: int, schedule: Schedule,
                    compressor: Compressor) -> torch.Tensor:
    """Log-counts after compress_tail replaced entries [start, start + m * W) by m windows of
    `schedule.keep` exact entries (count 1) and one super-token (count W - keep if proportional)."""
    pooled = schedule.window - schedule.keep
    window = torch.zeros(schedule.per_window)
    window[-1] = math.log(pooled) if proportional(compressor) else 0.0
    return torch.cat([log_count[:start], window.repeat(m), log_count[start + m * schedule.window:]])


def merge_positions(last_pos: torch.Tensor, start: int, m: int, schedule: Schedule) -> torch.Tensor:
    """Newest true position each entry stands for after compress_tail: every entry a window leaves (its
    kept ones and its super-token) takes the window's last, so a sliding-window layer evicts a window
    as one unit. Evicting kept entries by their own positions would let layers of one type (each keeps
    its own choice) hold different numbers of entries, and transformers builds one mask per type."""
    w = schedule.window
    window_last = last_pos[start:start + m * w].view(m, w)[:, -1:]
    return torch.cat([last_pos[:start], window_last.expand(m, schedule.per_window).reshape(-1),
                      last_pos[start + m * w:]])


def full_windows(length: int, n_final: int, schedule: Schedule) -> tuple[int, int]:
    """(first entry, m) of the m full windows of W older than the newest `recent` that a layer holding
    `length` entries, the first `n_final` final, compresses now (m = 0 with the schedule off); the
    `sink` entries are final whatever n_final says."""
    start = n_final if n_final >= schedule.sink else min(schedule.sink, length)
    m = max(length - start - schedule.recent, 0) // schedule.window if schedule.enabled else 0
    return start, m


def compress_tail(keys: torch.Tensor, values: torch.Tensor, n_final: int, schedule: Schedule,
                  compressor: Compressor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Coarse-grain every full window of the dense tail that is older than `recent`.

    keys/values: (B, H, L, D); entries [0, n_final) are final (sink + compressed windows).
    Each window of W becomes, in this order, `schedule.keep` exact entries and one super-token pooled
    from the rest: each window's `keep` most important entries (`compressor.importance`, mean over
    heads, original order: one choice for all heads). Returns new keys, values, n_final and the number
    m of windows compressed.
    (`compress_scored` is the one-shot variant whose exact entries are chosen across the windows.)
    """
    n_final, m = full_windows(keys.shape[-2], n_final, schedule)
    if m == 0:
        return keys, values, n_final, 0
    b, h, _, d = keys.shape
    w, keep = schedule.window, schedule.keep
    end = n_final + m * w
    kw = keys[:, :, n_final:end].reshape(b, h, m, w, d)
    vw = values[:, :, n_final:end].reshape(b, h, m, w, d)
    if keep:
        score = compressor.importance(kw, vw, layer_idx).float().mean(1)  # (B, m, W): one choice per row
        kept = score.topk(keep, dim=-1).indices.sort(-1).values
        rest = (~torch.zeros(b, m, w, dtype=torch.bool, device=kw.device).scatter(-1, kept, True)
                ).nonzero()[:, -1].view(b, m, w - keep)
        take = lambda x, idx: torch.gather(x, 3, idx[:, None, :, :, None].expand(b, h, m, idx.shape[-1], d))  # noqa: E731
        exact_k, exact_v = take(kw, kept), take(vw, kept)
        kw, vw = take(kw, rest), take(vw, rest)
    kt, vt = compressor(kw, vw, layer_idx)
    kt, vt = kt.to(keys.dtype), vt.to(values.dtype)
    if keep:  # per window: its kept entries, then its super-token
        kt = torch.cat([exact_k, kt.unsqueeze(-2)], dim=-2).reshape(b, h, m * (keep + 1), d)
        vt = torch.cat([exact_v, vt.unsqueeze(-2)], dim=-2).reshape(b, h, m * (keep + 1), d)
    keys = torch.cat([keys[:, :, :n_final], kt, keys[:, :, end:]], dim=-2)
    values = torch.cat([values[:, :, :n_final], vt, values[:, :, end:]], dim=-2)
    return keys, values, n_final + m * schedule.per_window, m


def compress_scored(keys: torch.Tensor, values: torch.Tensor, n_final: int, schedule: Schedule,
                    compressor: Compressor, layer_idx: int, scores: torch.Tensor, exact: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """compress_tail's m full windows, with their exact entries chosen across all of them by `scores`
    (KV heads, L) (compression/reconstruction.py; NaN: not scored, chosen last): each head keeps its
    `exact` best-scored entries of the m W, and the others are pooled, in order, into super-tokens of
    W - keep tokens each (the last one of fewer). The region then holds the exact entries, then the
    super-tokens. Returns new keys, values, n_final and the tokens each entry of the region stands
    for (None: nothing compressed)."""
    n_final, m = full_windows(keys.shape[-2], n_final, schedule)
    if m == 0:
        return keys, values, n_final, None
    b, h, _, d = keys.shape
    region, group = m * schedule.window, schedule.window - schedule.keep
    exact = min(max(exact, 0), region)
    end = n_final + region
    kw, vw = keys[:, :, n_final:end], values[:, :, n_final:end]
    ranked = scores[:, n_final:end].float().nan_to_num(nan=float("-inf")).to(keys.device).expand(b, h, region)
    kept = ranked.topk(exact, dim=-1).indices.sort(-1).values
    rest = (~torch.zeros(b, h, region, dtype=torch.bool, device=keys.device).scatter(-1, kept, True)
            ).nonzero()[:, -1].view(b, h, region - exact)
    take = lambda x, idx: torch.gather(x, 2, idx[..., None].expand(b, h, idx.shape[-1], d))  # noqa: E731
    out_k, out_v = [take(kw, kept)], [take(vw, kept)]
    rk, rv = take(kw, rest), take(vw, rest)
    full, part = divmod(region - exact, group)
    counts = [1] * exact + [group] * full + ([part] if part else [])
    for lo, n_groups, size in ((0, full, group), (full * group, 1 if part else 0, part)):
        if n_groups:
            hi = lo + n_groups * size
            kt, vt = compressor(rk[:, :, lo:hi].reshape(b, h, n_groups, size, d),
                                rv[:, :, lo:hi].reshape(b, h, n_groups, size, d), layer_idx)
            out_k.append(kt.to(keys.dtype))
            out_v.append(vt.to(values.dtype))
    keys = torch.cat([keys[:, :, :n_final], *out_k, keys[:, :, end:]], dim=-2)
    values = torch.cat([values[:, :, :n_final], *out_v, values[:, :, end:]], dim=-2)
    return keys, values, n_final + len(counts), torch.tensor(counts, dtype=torch.float32)


class CompressedLayer(DynamicLayer):
    """One layer's cache: stores sink + super-tokens + recent; remembers true positions for eviction."""

    def __init__(self, layer_idx: int, schedule: Schedule, compressor: Compressor | None, sliding_window: int | None):
        super().__init__()
        self.layer_idx, self.schedule, self.compressor = layer_idx, schedule, compressor
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0  # tokens seen (true position of the next token)
        self.n_final = 0
        self.last_pos = torch.zeros(0, dtype=torch.long)  # newest true position each entry stands for
        self.proportional = proportional(compressor)
        self.log_count = torch.zeros(0)  # log of the tokens each stored entry stands for
        self.deferred = False  # FMKVCCache.begin_turn: hold everything exact until end_turn
        # (KV heads, stored entries): scores by context reconstruction (compression/reconstruction.py),
        # NaN where not scored; None: the windows choose their exact entries by the method's importance.
        # `exact_budget`: how many of the next compressed windows' entries stay exact (set by
        # FMKVCCache.allocate_exact right before it compacts)
        self.exact_scores: torch.Tensor | None = None
        self.exact_budget: int | None = None

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.proportional and bool(self.log_count.any()):  # super-tokens stored: this step weighs them
            attention.publish(self.layer_idx, self.log_count)
        q = key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        new_pos = torch.arange(self.seen, self.seen + q)
        last_pos = torch.cat([self.last_pos, new_pos])
        self.seen += q
        keys, values = full_k, full_v
        log_count = torch.cat([self.log_count, torch.zeros(q)])
        if self.sliding_window is not None:  # drop what the dense layer could no longer see
            keep = last_pos >= self.seen + 1 - self.sliding_window
            if not bool(keep.all()):
                n_drop = int((~keep).sum())  # entries are ordered by position: drop a prefix
                keys, values, last_pos = keys[:, :, n_drop:], values[:, :, n_drop:], last_pos[n_drop:]
                log_count = log_count[n_drop:]
                self.n_final = max(self.n_final - n_drop, 0)
        self.keys, self.values, self.last_pos, self.log_count = keys, values, last_pos, log_count
        if self.exact_scores is not None:  # the new entries are not scored (full-attention layers only)
            unscored = self.exact_scores.new_full((len(self.exact_scores), q), float("nan"))
            self.exact_scores = torch.cat([self.exact_scores, unscored], -1)
        if not self.deferred:
            self.compact()
        return full_k, full_v  # this step's attention still sees what it was given

    def dense_length(self) -> int:
        """Entries the dense model's layer would hold now: every token seen, or on a sliding-window
        layer the newest window's worth."""
        return self.seen if self.sliding_window is None else min(self.seen, self.sliding_window - 1)

    def compact(self) -> None:
        """Compress every full window older than the newest `recent` entries (what `update` does after
        each step unless the cache's owner deferred it to the end of a session's turn); a schedule
        that does not pool keeps the newest entries, as many as pooling would leave."""
        if not self.schedule.pool:
            if self.schedule.enabled:
                drop = self.stored() - self.schedule.expected_length(self.dense_length())
                if drop > 0:
                    self.keys, self.values = self.keys[:, :, drop:], self.values[:, :, drop:]
                    self.last_pos, self.log_count = self.last_pos[drop:], self.log_count[drop:]
            return
        if self.exact_budget is not None and self.exact_scores is not None:
            self.compact_scored()
            return
        keys, values, self.n_final, m = compress_tail(self.keys, self.values, self.n_final, self.schedule,
                                                      self.compressor, self.layer_idx)
        if m:
            start = self.n_final - m * self.schedule.per_window
            self._forget_scores(start, m * self.schedule.window, m * self.schedule.per_window)
            self.last_pos = merge_positions(self.last_pos, start, m, self.schedule)
            self.log_count = merge_log_count(self.log_count, start, m, self.schedule, self.compressor)
        self.keys, self.values = keys, values

    def compact_scored(self) -> None:
        """`compact` with the exact entries chosen by their scores, `exact_budget` of them, across the
        windows it compresses (compress_scored)."""
        budget, self.exact_budget = self.exact_budget, None
        keys, values, self.n_final, counts = compress_scored(self.keys, self.values, self.n_final, self.schedule,
                                                             self.compressor, self.layer_idx, self.exact_scores, budget)
        if counts is None:
            return
        start, region = self.n_final - len(counts), int(counts.sum())
        # every entry of the region takes its newest position (kept entries are out of order there)
        self.last_pos = torch.cat([self.last_pos[:start], self.last_pos[start + region - 1].expand(len(counts)),
                                   self.last_pos[start + region:]])
        weight = counts.log() if self.proportional else torch.zeros(len(counts))
        self.log_count = torch.cat([self.log_count[:start], weight, self.log_count[start + region:]])
        self._forget_scores(start, region, len(counts))
        self.keys, self.values = keys, values

    def compressible(self) -> tuple[int, int]:
        """(first entry, entries) of the full windows the next `compact` would compress."""
        start, m = full_windows(self.stored(), self.n_final, self.schedule)
        return start, m * self.schedule.window if self.schedule.pool else 0

    def _forget_scores(self, start: int, region: int, left: int) -> None:
        """The `left` entries that replaced `region` entries from `start` are final: not scored."""
        if self.exact_scores is not None:
            s = self.exact_scores
            self.exact_scores = torch.cat([s[:, :start], s.new_full((len(s), left), float("nan")),
                                           s[:, start + region:]], -1)

    def prefix_view(self, n_tail: int, keys: torch.Tensor, values: torch.Tensor) -> "CompressedLayer":
        """This layer as it was before its newest n_tail tokens arrived, with `keys`/`values` in place of
        the older entries, compressing nothing more: re-reading those n_tail tokens over it is what
        compression/refine.py fits the super-tokens to."""
        view = CompressedLayer(self.layer_idx, replace(self.schedule, enabled=False), self.compressor,
                               self.sliding_window)
        view.lazy_initialization(keys, values)
        view.keys, view.values = keys, values
        view.seen = self.seen - n_tail
        view.n_final = min(self.n_final, keys.shape[-2])
        view.last_pos, view.log_count = self.last_pos[:-n_tail], self.log_count[:-n_tail]
        return view

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        stored = self.stored()
        return stored + cache_position.shape[0], self.seen - stored

    def stored(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back to a token position")


class FMKVCCache(Cache):
    """Cache whose layers compress themselves; `compressor=None` (or schedule.enabled=False) is dense."""

    def __init__(self, config, schedule: Schedule = Schedule(), compressor: Compressor | None = None,
                 sliding_schedule: Schedule | None = None):
        """`sliding_schedule`: the schedule of the model's sliding-window layers (None: `schedule`).
        Those layers forget everything older than their window anyway (Gemma 3: 512 tokens), so
        they can be pooled coarser than the full-attention layers that hold a long session's facts."""
        cfg = config.get_text_config(decoder=True)
        sliding = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or [
            "sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers
        if compressor is None:
            schedule = Schedule(schedule.window, schedule.sink, schedule.recent, enabled=False)
            sliding_schedule = None
        local = sliding_schedule or schedule
        layers = [CompressedLayer(i, local if t in ("sliding_attention", "chunked_attention") else schedule,
                                  compressor, sliding if t in ("sliding_attention", "chunked_attention") else None)
                  for i, t in enumerate(types)]
        super().__init__(layers=layers)
        self.schedule = schedule
        self.refine = None  # a compression.refine.RefineConfig: refit the super-tokens after each prefill
        # a compression.reconstruction.Reconstruction: score each prompt's entries by context
        # reconstruction once it is read, and keep the best-scored exact (set by `new_cache`)
        self.reconstruct = None
        self.in_turn = False
        if schedule.enabled and proportional(compressor) and not attention.enabled(cfg):
            raise ValueError(f"this compressor's super-tokens need proportional attention: call "
                             f"compression.attention.enable(model) (attn_implementation={attention.NAME!r}) first")

    def prefix_view(self, n_tail: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Cache:
        """A cache as this one was before its newest n_tail tokens, holding the given older entries per
        layer (see `CompressedLayer.prefix_view`); this cache is left as it is."""
        return Cache(layers=[layer.prefix_view(n_tail, k, v) for layer, k, v in zip(self.layers, keys, values)])

    def kv_lengths(self) -> list[int]:
        """Stored entries per layer (what the memory holds), as opposed to tokens seen."""
        return [layer.stored() for layer in self.layers]

    # ---- the hooks a session calls around each turn (latentwire.sessions) -----------------------------
    def begin_turn(self) -> None:
        """Hold the turn about to be read and answered exact: nothing is compressed until `end_turn`,
        so the answer is decoded over the whole turn (a turn is longer than `recent`: compressing as it
        is read pooled the record being asked about before its answer was written)."""
        self.in_turn = True
        self.hold()

    def end_turn(self) -> None:
        """Compress what the turn left beyond the schedule: between turns the session holds the budget."""
        self.in_turn = False
        self.allocate_exact()
        for layer in self.layers:
            layer.deferred = False
            if layer.stored():
                layer.compact()

    def allocate_exact(self) -> None:
        """Spread the exact entries of the windows about to be compressed over the scored layers by
        their scores, as KVzip spreads its budget: the layers' best-scored entries (the largest over
        heads) together, as many as `keep` per window in every layer, less one per layer for the
        super-token that pools a remainder. A layer whose entries draw no reconstruction attention
        keeps few exact and more super-tokens; one that is read to repeat the text keeps many."""
        scored = [layer for layer in self.layers if layer.exact_scores is not None and layer.schedule.keep]
        regions = [layer.compressible() for layer in scored]
        if not scored or not any(n for _, n in regions):
            return
        best = [layer.exact_scores[:, start:start + n].float().amax(0).nan_to_num(nan=float("-inf"))
                for layer, (start, n) in zip(scored, regions)]
        total = sum(n // layer.schedule.window * layer.schedule.keep - 1 for layer, (_, n) in zip(scored, regions) if n)
        flat = torch.cat(best)
        chosen = flat.topk(max(min(total, int(torch.isfinite(flat).sum())), 0)).indices
        owner = torch.repeat_interleave(torch.arange(len(scored)), torch.tensor([len(b) for b in best]))
        per_layer = torch.bincount(owner[chosen], minlength=len(scored))
        for layer, k in zip(scored, per_layer.tolist()):
            layer.exact_budget = k

    def hold(self) -> None:
        """Compress nothing until `end_turn` (a cache that scores by reconstruction holds each prompt
        exact until it is scored)."""
        for layer in self.layers:
            layer.deferred = True

    # ---- the hook a generation loop calls around its prefill (latentwire.runtime, eval-cache) ----------
    def tail_tokens(self, n_prompt: int) -> int:
        """Prompt positions whose logits `after_prefill` reads (the prefill's `logits_to_keep`)."""
        return max(self.refine.tail_tokens(self, n_prompt), 1) if self.refine is not None else 1

    def after_prefill(self, model, output, inputs_embeds: torch.Tensor | None = None,
                      input_ids: torch.Tensor | None = None) -> dict | None:
        """Called once the prompt (1, n) is prefilled, with the prefill's output (logits of the last
        `tail_tokens(n)` positions): with `reconstruct` set, score the prompt's entries by context
        reconstruction and (unless a session's turn goes on: `end_turn` does it) compress; with
        `refine` set, refit the super-tokens on the prompt's tail (compression/refine.py) and return
        what the refinement reports."""
        if self.reconstruct is not None:  # score the prompt's entries, then (outside a turn) compress
            embeds = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
            self.reconstruct.score(model, self, embeds)
            if not self.in_turn:
                self.end_turn()
        tail = output.logits.shape[1]
        if self.refine is None or tail <= 1:
            return None
        model.requires_grad_(False)  # gradients reach the super-tokens only
        if inputs_embeds is not None:
            return refine_super_tokens(model, self, teacher_logits=output.logits[0], cfg=self.refine,
                                       tail_embeds=inputs_embeds[0, -tail:])
        return refine_super_tokens(model, self, input_ids[0, -tail:], output.logits[0], self.refine)


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache (dense or compressed)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def new_cache(model, compressor: Compressor, schedule: Schedule, sliding_schedule: Schedule | None = None,
              reconstruct=None) -> FMKVCCache:
    """A fresh cache for `model` that `compressor` (a window method, compression.methods) keeps
    compressed with `schedule`; with refinement on (fmkvc refine_steps > 0) it refits its super-tokens
    on the prompt's tail after each prefill (`FMKVCCache.after_prefill`). `reconstruct` (a
    compression.reconstruction.Reconstruction): the schedule's exact entries are chosen by context
    reconstruction over each prompt (`select="reconstruction"`) instead of per window."""
    if reconstruct is not None and schedule.enabled:
        check_select("reconstruction", schedule.keep)
    compresses = compressor.compresses() and schedule.enabled
    schedule = replace(schedule, enabled=compresses)
    compressor.bind(model, schedule)
    if sliding_schedule is not None:
        sliding_schedule = replace(sliding_schedule, enabled=compresses)
        compressor.bind(model, sliding_schedule)  # the same checks (e.g. the sidecar's largest window)
    cache = FMKVCCache(model.config, schedule, compressor if compresses else None, sliding_schedule)
    cache.refine = compressor.refinement()
    if reconstruct is not None and cache.schedule.enabled:
        cache.reconstruct = reconstruct
        cache.hold()  # the first prompt stays exact until it is scored
        attention.enable(model)  # its layers hold different numbers of entries (proportional_sdpa's mask)
    return cache


def cache_factory(model, *, method: str = "fmkvc", profile: str | None = None, window: int = 8, sink: int = 4,
                  recent: int = 64, keep: int = 0, sliding_layers: str = "pool", select: str = "window",
                  tokenizer=None, **options) -> FMKVCCache:
    """`new_cache` for the registered method named `method` with `options` for it (fmkvc: weights,
    refine_steps, refine_lr); pass `partial(cache_factory, method=..., profile=..., window=...)` (or
    `factory(...)`, which checks them first) as `AgentModel(cache_factory=...)`. `select`: how the
    `keep` exact entries are chosen ("window": each window's by the method's importance;
    "reconstruction": by context reconstruction over each prompt, which needs the model's `tokenizer`)."""
    check_select(select, keep)
    schedule = Schedule(window, sink, recent, keep=keep)
    return new_cache(model, _serving_method(method, profile, options), schedule,
                     sliding_layer_schedule(schedule, sliding_layers), reconstruction(select, tokenizer))


def reconstruction(select: str, tokenizer=None):
    """The `reconstruct` of `new_cache` for a `select` option (`compression.base.check_select`): None
    for "window"."""
    if select == "window":
        return None
    if tokenizer is None:
        raise ValueError("select='reconstruction' needs the model's tokenizer (the repeat prompt is text)")
    from compression.reconstruction import Reconstruction

    return Reconstruction.for_tokenizer(tokenizer)


def sliding_layer_schedule(schedule: Schedule, sliding_layers: str) -> Schedule | None:
    """The schedule of a model's sliding-window layers (Gemma 3, Mistral): "pool" (None: the same as
    the full-attention layers) or "newest": they keep their newest entries, as many as pooling would
    leave, and no super-token. Those layers forget whatever leaves their window anyway (a long
    session's facts live in the full-attention layers), and super-tokens there derail Gemma 3 in a
    conversation (docs/sessions.md)."""
    if sliding_layers not in SLIDING_LAYERS:
        raise ValueError(f"sliding_layers={sliding_layers!r}: one of {', '.join(SLIDING_LAYERS)}")
    return None if sliding_layers == "pool" else replace(schedule, keep=0, pool=False)


LAYOUT = ("method", "profile", "window", "sink", "recent", "keep", "sliding_layers", "select",
          "tokenizer")  # not method options


def factory(**kwargs) -> Callable:
    """`AgentModel(cache_factory=factory(method="fmkvc", profile="gemma3-270m", window=8))`: the method
    name and its options are checked now (a clear error before any model loads), the cache is made
    per generation by `cache_factory`."""
    _serving_method(kwargs.get("method", "fmkvc"), kwargs.get("profile"),
                    {k: v for k, v in kwargs.items() if k not in LAYOUT})
    sliding_layer_schedule(Schedule(kwargs.get("window", 8), kwargs.get("sink", 4), kwargs.get("recent", 64),
                                    keep=kwargs.get("keep", 0)), kwargs.get("sliding_layers", "pool"))
    check_select(kwargs.get("select", "window"), kwargs.get("keep", 0))  # its tokenizer may come later (services.agent)
    return partial(cache_factory, **kwargs)


def _serving_method(method: str, profile: str | None, options: dict) -> Compressor:
    import compression.methods  # noqa: F401  (registers every method)

    compressor = build(method, context={"profile": profile}, **options)
    if not compressor.serves():
        raise ValueError(f"KV compression method {method!r} prunes once at prefill (a kvpress press): "
                         f"eval-cache runs it, an agent's cache cannot")
    return compressor
