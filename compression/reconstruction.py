"""Context reconstruction (KVzip, Kim et al., 2025) as the importance signal of FMKVC's exact entries.

A prompt's cache entries are scored once it is read: the model is asked to repeat it ("Repeat the
previous context exactly." then the prompt again, in chunks) over the prompt's own cache, and each
entry scores the largest attention any reconstruction query of its KV group pays it. An entry that must
be read to reproduce the text (a name, a number: what no neighbour predicts) scores high; one the
model could rebuild from its neighbours scores low. It is query-agnostic: no later question is known.

kvpress's `KVzipPress` does the same to evict (masking, not removing, entries; it refuses Gemma 3).
Here the scores choose which entries of FMKVC's hybrid memory stay exact (`FMKVCCache.reconstruct`,
`select="reconstruction"`): the windows a turn leaves to compress hold, in every layer together, as
many exact entries as the per-window hybrid would (`keep` per window), but they are the best-scored
of all those windows in all layers (`FMKVCCache.allocate_exact`, KVzip's budget across layers), and
the rest of each layer is pooled into super-tokens of W - keep tokens as before
(`compression.cache.compress_scored`). A layer that is read to repeat the text keeps many exact
entries, one whose attention goes elsewhere keeps few: layers then hold different numbers of
entries (`compression.attention.proportional_sdpa` masks each by its own length).

The repeat pass runs on a copy of the cache (`fork`: layers copied, tensors shared), so the cache
itself never sees the reconstruction tokens. Its cost is about one more prefill of the prompt; the
scores are taken as KVzip does, from the attention of each chunk's reconstruction over the first
`sink` entries, the chunk's entries and the reconstruction itself. Sliding-window layers are not
scored (they forget old entries anyway); their windows fall back to the method's own `importance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

REPEAT = "\n\nRepeat the previous context exactly.\n"  # KVzip's prompt, as kvpress words it


def fork(cache):
    """A copy of a cache that a forward pass can extend and drop (the repeat pass below; eval-session's
    probe questions): its layers copied, their tensors shared (an update replaces a layer's tensors,
    it never writes into them)."""
    import copy

    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


@dataclass
class Reconstruction:
    """Scores a prompt's entries by context reconstruction (the module docstring)."""

    prompt_ids: torch.Tensor = field(repr=False)  # (p,) the tokens of REPEAT in the model's vocabulary
    chunk: int = 512  # prompt tokens reconstructed per pass (attention memory grows with its square)
    sink: int = 4

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> "Reconstruction":
        ids = tokenizer(REPEAT, add_special_tokens=False).input_ids
        return cls(torch.tensor(ids, dtype=torch.long), **kwargs)

    @torch.no_grad()
    def score(self, model, cache, embeds: torch.Tensor) -> None:
        """Score the newest embeds.shape[1] entries of every full-attention layer of `cache` (which
        holds the prompt `embeds` (1, n, hidden) exact, as its last n entries) into the layers'
        `exact_scores` (KV heads, entries): NaN where not scored."""
        n = embeds.shape[1]
        full = [i for i, layer in enumerate(cache.layers) if layer.sliding_window is None and layer.stored() >= n]
        if not full or n == 0:
            return
        heads = cache.layers[full[0]].keys.shape[1]
        scores = {i: torch.full((heads, n), float("-inf")) for i in full}
        state: dict = {}
        blocks = [model.model.layers[i].self_attn for i in full]
        hooks = [b.register_forward_hook(partial(_score_hook, state=state, scores=scores), with_kwargs=True)
                 for b in blocks]
        prompt = model.get_input_embeddings()(self.prompt_ids[None].to(embeds.device)).to(embeds.dtype)
        past = cache.get_seq_length()
        try:
            for start in range(0, n, self.chunk):
                end = min(start + self.chunk, n)
                rep = torch.cat([prompt, embeds[:, start:end]], dim=1)
                state.update(n=n, start=start, end=end, sink=self.sink)
                model.model(inputs_embeds=rep, past_key_values=fork(cache), use_cache=True,
                            position_ids=torch.arange(past, past + rep.shape[1], device=rep.device)[None])
        finally:
            for h in hooks:
                h.remove()
        for i in full:
            layer = cache.layers[i]
            old = layer.exact_scores
            have = old if old is not None and old.shape[-1] == layer.stored() else torch.full(
                (heads, layer.stored()), float("nan"))
            layer.exact_scores = torch.cat([have[:, :-n], scores[i]], -1)


def _score_hook(module, args, kwargs, output, *, state: dict, scores: dict):
    """After an attention block ran on a reconstruction chunk: the largest attention (over query heads
    in its KV group and reconstruction queries) each of the chunk's entries got, per KV head."""
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    hidden = kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    q_len = hidden.shape[1]
    queries = get_prerope_query_states(module, hidden)
    queries = queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)
    keys = kwargs["past_key_values"].layers[module.layer_idx].keys  # the fork's: ... prompt, this chunk
    prompt_at = keys.shape[-2] - q_len - state["n"]  # layers may hold different numbers of older entries
    first, last = prompt_at + state["start"], prompt_at + state["end"]
    sink = min(state["sink"], first)
    keys = torch.cat([keys[:, :, :sink], keys[:, :, first:last], keys[:, :, -q_len:]], dim=2)
    b, h_kv, k_len, d = keys.shape
    groups = queries.shape[1] // h_kv
    queries = queries.view(b, h_kv, groups, q_len, d).float()
    scale = getattr(module, "scaling", 1.0 / math.sqrt(d))
    logits = torch.matmul(queries, keys.float()[:, :, None].transpose(-1, -2)) * scale  # (b, h_kv, g, q, k)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).triu(1)
    logits[..., -q_len:] = logits[..., -q_len:].masked_fill(causal, float("-inf"))
    weights = logits.softmax(-1)[..., sink:sink + last - first]
    got = weights.amax(dim=(0, 2, 3)).cpu()  # (h_kv, chunk): each entry's largest attention in its group
    s = scores[module.layer_idx]
    start = state["start"]
    s[:, start:start + got.shape[-1]] = torch.maximum(s[:, start:start + got.shape[-1]], got)
    return output
