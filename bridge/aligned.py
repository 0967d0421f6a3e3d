"""The aligned bridge: one soft token per context token, inside the target's own vocabulary simplex.

StatisticalNormalizer (as in the Perceiver bridge) -> a linear map fitted by ridge regression to
the target's embedding of the same piece of text -> a vocabulary projection: the soft token is the
softmax-weighted mean of target input embeddings, weights exp(-||x - e_v||^2 / (tau * d * rms^2)).

Why not the Perceiver resampler: with the few training entities a generator can make, K learned
queries learned a lookup table of the training names (held-out EM 0.14, results/bridge/sweep.json),
while a per-token map fitted on all offline text and the whole source vocabulary has to be a
lexical map, and so copies names it never saw. Why the projection: the regression's raw outputs
are shrunken averages off the embedding manifold, and the target misreads them although their
nearest embeddings are right (97% of answer tokens, EM 0.43 on 60 held-out items); a convex
combination of real embeddings is read like text (EM 0.83) and stays continuous and
differentiable (no codebook: discrete bottlenecks such as VQ and FSQ collapsed in earlier work on
latent channels).

A per-token lexicon (`set_lexicon`, fitted by `bridge.align.fit_lexicon`) corrects the map where
it is lexical but wrong: the source tokens whose mapped state lands nearer another token's row than
their own get a prior for their own row.

The projection needs the target's embedding rows. They are not shipped in the bridge file (the
Gemma 3 matrix alone is 670 MB): the file stores the row ids and a digest of the rows, and loading
reads the rows from the target model's weights and refuses them if the digest differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from bridge.base import BRIDGES, BridgeBase, StatisticalNormalizer, JobRef
from latentwire import weights
from latentwire.runtime import fast_bfloat16

ROW_CHUNK = 512  # soft tokens projected at a time: bounds the (rows x vocab) distance matrix
SEARCH_MARGIN = 16  # candidates a low-precision search rescores at least (results/bridge/search_speed.json)


@dataclass
class AlignedConfig:
    source_model: str
    target_model: str
    source_layer: int
    d_src: int
    d_tgt: int
    temperature: float = 0.01  # of the vocabulary softmax, in units of d_tgt * embed_rms^2
    embed_rms: float = 1.0  # RMS of the target's input embeddings of real text
    embed_scale: float = 1.0  # the target's embedding multiplier (Gemma: sqrt(d))
    vocab_digest: str = ""  # sha256 of the (scaled) vocabulary rows, checked on load
    # nearest vocabulary rows the softmax keeps per soft token (the packaged bridge has the default;
    # results/bridge/search_speed.json measured an earlier file with 32)
    top_k: int = 64
    arch: str = "aligned"

    @property
    def bridge_id(self) -> str:
        return f"{self.source_model}@{self.source_layer}->{self.target_model}/aligned"


def vocab_digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest()


def _keep_nearest(d2: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances of each row (of more candidates than k), with their indices."""
    if d2.shape[1] <= k:
        return d2, idx
    d2, keep = d2.topk(k, dim=-1, largest=False)
    return d2, idx.gather(1, keep)


def _widen(d2: torch.Tensor, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad candidates to `width` columns with empty slots (infinite distance, row 0: weight 0)."""
    pad = width - d2.shape[1]
    if pad <= 0:
        return d2, idx
    return (torch.nn.functional.pad(d2, (0, pad), value=float("inf")), torch.nn.functional.pad(idx, (0, pad)))


@BRIDGES.register("aligned")
class AlignedBridge(BridgeBase):
    config_class = AlignedConfig
    train_job = JobRef("bridge.align", "bridge-aligned")

    def __init__(self, cfg: AlignedConfig, vocab_ids: torch.Tensor, vocab: torch.Tensor):
        super().__init__(cfg)
        self.normalizer = StatisticalNormalizer(cfg.d_src)
        self.proj = nn.Linear(cfg.d_src, cfg.d_tgt)
        self.register_buffer("vocab_ids", vocab_ids.to(torch.int64))
        self.register_buffer("vocab", vocab.float(), persistent=False)  # scaled target embedding rows
        self.register_buffer("vocab_sq", self.vocab.pow(2).sum(-1), persistent=False)
        self.token_index = None
        self.set_lexicon(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        self.use_search_dtype("float32")

    def set_lexicon(self, tokens: torch.Tensor, rows: torch.Tensor, margin: torch.Tensor) -> "AlignedBridge":
        """A per-token prior: a soft token whose source token is `tokens[i]` scores vocabulary row
        `rows[i]` (its own piece of text) as `margin[i]` nearer than the map puts it.

        The linear map is lexical but not exact: over the whole source vocabulary about a fifth of
        the tokens land nearest another token's row in any one context, most of them in every
        context (`ĠHelena` on `▁Amanda`), so the target reads another name. `bridge.align.fit_lexicon`
        finds those tokens and the margin that brings their own row first. Applied only where the packet names its source tokens."""
        dev = self.vocab.device
        n = int(tokens.max()) + 1 if len(tokens) else 0
        row_of = torch.full((n,), -1, dtype=torch.long, device=dev)
        row_of[tokens.long().to(dev)] = rows.long().to(dev)
        margin_of = torch.zeros(n, device=dev)
        margin_of[tokens.long().to(dev)] = margin.float().to(dev)
        # dense by source token id; not in state_dict (`save` writes the lexicon when there is one)
        self.register_buffer("lexicon_row_of", row_of, persistent=False)
        self.register_buffer("lexicon_margin_of", margin_of, persistent=False)
        return self

    def lexicon(self) -> dict[str, torch.Tensor]:
        """The lexicon as stored (empty when there is none): token ids, their rows, their margins."""
        tokens = (self.lexicon_row_of >= 0).nonzero()[:, 0]
        if not len(tokens):
            return {}
        return {"lexicon_tokens": tokens.cpu(), "lexicon_rows": self.lexicon_row_of[tokens].cpu(),
                "lexicon_margin": self.lexicon_margin_of[tokens].float().cpu()}

    def _with_lexicon(self, x, token_ids, d2, idx, k):
        """Candidates of `_near_rows` with each listed token's own row in them at its prior distance:
        in the row's place if it is a candidate already, else in an empty slot while there are
        fewer than `k`, else in the farthest candidate's."""
        row_of, margin_of = self.lexicon_row_of, self.lexicon_margin_of
        if token_ids is None or not len(row_of):
            return d2, idx
        own = row_of[token_ids.clamp(0, len(row_of) - 1)].masked_fill((token_ids < 0) | (token_ids >= len(row_of)), -1)
        sel = (own >= 0).nonzero()[:, 0]
        if not len(sel):
            return d2, idx
        d2, idx = _widen(d2, idx, min(k, d2.shape[1] + 1))  # a free slot unless k are already there
        c, e = own[sel], self.vocab[own[sel]]
        dc = (x[sel] - e).pow(2).sum(-1) - margin_of[token_ids[sel]]
        there = idx[sel] == c[:, None]
        col = torch.where(there.any(1), there.float().argmax(1), d2[sel].argmax(1))
        # in place: every search path returns fresh tensors
        d2[sel, col], idx[sel, col] = dc, c
        return d2, idx

    @classmethod
    def from_embeddings(cls, cfg: AlignedConfig, vocab_ids: torch.Tensor, embeddings: torch.Tensor) -> "AlignedBridge":
        """A bridge over rows `vocab_ids` of the target's (unscaled) input embeddings. A config
        that names a digest must match the rows; one without gets theirs (a new fit)."""
        if int(vocab_ids.max()) >= embeddings.shape[0] or embeddings.shape[1] != cfg.d_tgt:
            raise ValueError(f"bridge {cfg.bridge_id} does not fit the embeddings of {cfg.target_model} "
                             f"({tuple(embeddings.shape)})")
        rows = embeddings[vocab_ids.long()].float() * cfg.embed_scale
        digest = vocab_digest(rows)
        if cfg.vocab_digest and digest != cfg.vocab_digest:
            raise ValueError(f"the embeddings of {cfg.target_model} are not the ones bridge {cfg.bridge_id} "
                             f"was fitted to (vocabulary digest differs)")
        cfg.vocab_digest = digest
        return cls(cfg, vocab_ids, rows)

    def num_soft_tokens(self, rows: int) -> int:
        return rows  # one per packet row

    @property
    def softmax_scale(self) -> float:
        """The vocabulary softmax's unit of squared distance: temperature x d x embed_rms^2."""
        return self.cfg.temperature * self.cfg.d_tgt * self.cfg.embed_rms ** 2

    def use_search_dtype(self, dtype: str = "auto") -> "AlignedBridge":
        """Score the vocabulary for the nearest rows in `dtype` ("float32", "bfloat16" or "auto":
        bfloat16 where the hardware multiplies it fast, a GPU or a CPU with AMX tiles).

        Only the choice of the top-k rows is made in that dtype (with a margin of SEARCH_MARGIN
        candidates); their distances, the softmax and the mix stay float32. On 5,541 real packet rows
        bfloat16 found every row's float32 nearest vocabulary row, and with top 32 (then packaged) it
        projected 256 / 1024 rows in 75 / 329 ms against 172 / 601 ms for float32 top 64 (2 threads,
        AMX; results/bridge/search_speed.json).
        """
        if dtype == "auto":
            dtype = "bfloat16" if fast_bfloat16(self.vocab.device) else "float32"
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"search dtype must be float32, bfloat16 or auto, not {dtype!r}")
        self.search_dtype = getattr(torch, dtype)
        self._search_rows = None  # made on first use, on the vocabulary's device
        return self

    def _search_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.search_dtype == torch.float32:
            return self.vocab_sq, self.vocab
        if self._search_rows is None or self._search_rows[1].device != self.vocab.device:
            self._search_rows = (self.vocab_sq.to(self.search_dtype), self.vocab.to(self.search_dtype))
        return self._search_rows

    def _near(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k nearest vocabulary rows, in no set order: float32 ||x - e||^2 (N, k) and
        their indices into `vocab` (N, k)."""
        n = self.vocab.shape[0]
        k = min(k, n)
        sq, vocab = self._search_tables()
        low = vocab.dtype != torch.float32
        # ||e||^2 - 2 x.e orders the rows like ||x - e||^2 (||x||^2 is the same for every row)
        score = torch.addmm(sq, x.to(vocab.dtype), vocab.T, alpha=-2.0)
        # rows picked in low precision get a margin of candidates, rescored in float32
        near, idx = score.topk(min(max(k, SEARCH_MARGIN), n) if low else k, dim=-1, largest=False)
        if low:
            near = self.vocab_sq[idx] - 2 * torch.bmm(self.vocab[idx], x[:, :, None])[..., 0]
            near, idx = _keep_nearest(near, idx, k)
        return near + x.pow(2).sum(-1, keepdim=True), idx

    def supports_token_index(self) -> bool:
        return True

    def use_token_index(self, offsets: torch.Tensor | None, rows: torch.Tensor | None) -> "AlignedBridge":
        """Search only the vocabulary rows listed for each row's source token (bridge/token_index.py):
        rows `rows[offsets[t]:offsets[t + 1]]` of `vocab` for source token t; a token with none
        listed is searched in the whole vocabulary. None: every row searches the whole vocabulary."""
        self.token_index = None if offsets is None else (offsets.long().to(self.vocab.device),
                                                          rows.long().to(self.vocab.device))
        return self

    def _near_listed(self, x: torch.Tensor, token_ids: torch.Tensor, k: int):
        """`_near` over each row's listed candidates (every listed token has at least one), exactly in
        float32: as many columns as the longest list (at most k); shorter lists end in empty slots."""
        offsets, listed = self.token_index
        start, count = offsets[token_ids], offsets[token_ids + 1] - offsets[token_ids]
        span = torch.arange(int(count.max()), device=x.device)
        valid = span[None] < count[:, None]
        idx = listed[(start[:, None] + span[None]).clamp(max=len(listed) - 1)].masked_fill(~valid, 0)
        d2 = (self.vocab_sq[idx] - 2 * torch.bmm(self.vocab[idx], x[:, :, None])[..., 0]
              + x.pow(2).sum(-1, keepdim=True))
        return _keep_nearest(d2.masked_fill(~valid, float("inf")), idx, k)

    def _near_rows(self, x: torch.Tensor, k: int, token_ids: torch.Tensor | None):
        """`_near`, through the token index for rows whose source token it lists; (N, <= k) columns."""
        k = min(k, self.vocab.shape[0])
        if token_ids is None or self.token_index is None:
            return self._near(x, k)
        offsets = self.token_index[0]
        ok = token_ids.ge(0) & token_ids.lt(len(offsets) - 1)
        tid = token_ids.clamp(0, len(offsets) - 2)
        hit = ok & (offsets[tid + 1] > offsets[tid])
        if bool(hit.all()):
            return self._near_listed(x, tid, k)
        if not bool(hit.any()):
            return self._near(x, k)
        on, off = hit.nonzero()[:, 0], (~hit).nonzero()[:, 0]
        d2 = torch.full((x.shape[0], k), float("inf"), device=x.device)
        idx = torch.zeros(x.shape[0], k, dtype=torch.long, device=x.device)
        d2[on], idx[on] = _widen(*self._near_listed(x[on], tid[on], k), k)
        d2[off], idx[off] = self._near(x[off], k)
        return d2, idx

    def nearest(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k nearest vocabulary rows, nearest first: (||x - e||^2 (N, k), their indices
        into `vocab`)."""
        d2, idx = self._near(x, k)
        d2, order = d2.sort(-1)
        return d2, idx.gather(1, order)

    def mapped(self, hidden: torch.Tensor) -> torch.Tensor:
        """The ridge map's output, before the projection (what the regression fits)."""
        return self.proj(self.normalizer(hidden.float()))

    def project(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d) -> soft tokens (N, d) and each row's largest vocabulary weight (N,).

        The softmax keeps each row's `top_k` nearest rows: at the fitted temperature the rest
        weigh less than float32 resolution (measured: results/bridge/aligned_sweep.json), and the
        weighted sum over the whole vocabulary cost as much again as the distances. The search
        passes candidates as (distance, row index) only and `embedding_bag` sums their rows: a
        gathered (rows x k x d) copy, padded to k and written through masks, cost four times the
        arithmetic (969 rows with the token index: 192 -> 38 ms, 2 AMX threads)."""
        scale = self.softmax_scale
        outs, peaks = [], []
        ids = [None] * len(x.split(ROW_CHUNK)) if token_ids is None else token_ids.split(ROW_CHUNK)
        for part, tid in zip(x.split(ROW_CHUNK), ids):
            d2, idx = self._near_rows(part, self.cfg.top_k, tid)
            d2, idx = self._with_lexicon(part, tid, d2, idx, self.cfg.top_k)
            p = torch.softmax(-d2 / scale, -1)
            # the weighted sum of the candidates' rows without gathering them (N x k x d) first
            outs.append(torch.nn.functional.embedding_bag(idx, self.vocab, per_sample_weights=p, mode="sum"))
            peaks.append(p.max(-1).values)
        if not outs:
            return x.new_zeros(0, self.cfg.d_tgt), x.new_zeros(0)
        return torch.cat(outs), torch.cat(peaks)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, d_src) [+ mask (B, T)] [+ the rows' source token ids (B, T), for the token
        index] -> soft tokens (B, T, d_tgt); padded rows are zero."""
        x = self.mapped(hidden)
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        out = x.new_zeros(x.shape)
        out[keep] = self.project(x[keep], None if token_ids is None else token_ids.to(x.device)[keep])[0]
        return out

    def tensors_to_save(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state dict in `dtype` (row ids stay integers) and the lexicon, when there is one."""
        tensors = {k: (v if k == "vocab_ids" else v.to(dtype)) for k, v in self.state_dict().items()}
        return {**tensors, **self.lexicon()}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, target_path: str | None = None,
             search_dtype: str = "float32", embeddings: torch.Tensor | None = None,
             sha256: str | None = None) -> "AlignedBridge":
        """`embeddings`: the target's (unscaled) input embedding matrix, if the caller has it;
        otherwise it is read from the target model's weights (`target_path` or its profile).
        `search_dtype`: see `use_search_dtype` (the bridge service and `latentwire eval` pass "auto"; the
        fit's own held-out check keeps float32)."""
        from latentwire import profiles

        tensors, manifest = weights.load(path, kind="bridge", sha256=sha256)
        cfg = cls.config_from_manifest(manifest)
        if embeddings is None:
            embeddings = profiles.input_embeddings(cfg.target_model, local_path=target_path)
        bridge = cls.from_embeddings(cfg, tensors["vocab_ids"].long(), embeddings)
        lexicon = [tensors.pop(k, None) for k in ("lexicon_tokens", "lexicon_rows", "lexicon_margin")]
        if lexicon[0] is not None:  # bridges fitted before the lexicon have none
            bridge.set_lexicon(*lexicon)
        bridge.load_state_dict({k: v.float() if k != "vocab_ids" else v.long() for k, v in tensors.items()},
                               strict=True)
        bridge.sha256 = manifest["sha256"]
        return bridge.to(device).eval().use_search_dtype(search_dtype)
