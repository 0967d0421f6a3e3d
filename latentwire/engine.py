"""The generation engine: greedy decoding from embeddings and hidden-state capture for one causal LM.

It knows nothing of the LatentWire prompts (`latentwire.prompts` builds them): it takes prompt
embeddings and returns tokens, or token ids and returns the states of one layer. What it owns is how
that runs fast and right: explicit attention masks and positions (left padding in batches, a
compressed cache whose length differs from the token position), a bfloat16 copy of the decoder for
the prompt forward where the hardware favours it (`latentwire.hardware`), length-grouped batches,
and the cache hook through which a compressed cache (`compression/`) reworks itself after the prompt.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from latentwire import hardware


def now_ms() -> float:
    return time.perf_counter() * 1000.0


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    cache_tokens: int = 0  # KV entries (layer 0) at the end: smaller than the tokens seen when compressed


class _StopForward(Exception):
    pass


def length_groups(items: list[int], lengths: list[int], max_padding: float = 0.25,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Split `items` into batches whose padding to their longest member adds at most `max_padding`
    and, with `max_tokens`, whose padded size (longest x members) stays within it."""
    order = sorted(range(len(items)), key=lambda k: lengths[k])
    groups: list[list[int]] = []
    for k in order:  # ascending lengths: the newest member is the longest
        padded = lengths[k] * (len(groups[-1]) + 1) if groups else 0
        if groups and padded <= (1 + max_padding) * (sum(lengths[j] for j in groups[-1]) + lengths[k]) \
                and (max_tokens is None or padded <= max_tokens):
            groups[-1].append(k)
        else:
            groups.append([k])
    return [[items[k] for k in g] for g in groups]


def stop_ids(model, tok, stop_on_newline: bool = False) -> set[int]:
    """Token ids that end a generation: the model's and tokenizer's EOS, the chat templates' end of
    turn, and with `stop_on_newline` (a base model answering in one line) the newline tokens."""
    ids = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for x in [tok.eos_token_id, gen_eos]:
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, list):
            ids.update(x)
    for t in ["<|im_end|>", "<end_of_turn>", "<eos>", "</s>"]:
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    if stop_on_newline:
        ids.update(i for i in tok.convert_tokens_to_ids(["\n", "Ċ", "\n\n"]) if isinstance(i, int)
                   and i != tok.unk_token_id)
    return ids


def decoder_copy(model, dtype: torch.dtype):
    """A copy of `model`'s decoder in `dtype`, without the embedding table (prompts arrive as
    embeddings) and with buffers such as RoPE's inv_freq left float32."""
    decoder = model.get_decoder()
    table = decoder.get_input_embeddings()
    decoder.set_input_embeddings(None)  # no second table
    try:
        fast = copy.deepcopy(decoder)
    finally:
        decoder.set_input_embeddings(table)
    for p in fast.parameters():  # parameters only: buffers stay float32
        p.data = p.data.to(dtype)
        p.requires_grad_(False)
    return fast.eval()


class Engine:
    """Greedy generation and hidden-state capture on one model, from embeddings or token ids.

    `cache_factory(model)` builds the KV cache of each `generate` (e.g. an FMKVC cache; None:
    transformers' DynamicCache). `batch_tokens` bounds the padded tokens one batched generation
    prefills (None: no bound); a larger batch runs as several.
    """

    def __init__(self, model, tok, *, name: str = "model", stop_on_newline: bool = False,
                 cache_factory: Callable | None = None, batch_tokens: int | None = None,
                 prefill_dtype: str = "float32"):
        self.model, self.tok, self.name = model, tok, name
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.cache_factory = cache_factory
        self.eos_ids = stop_ids(model, tok, stop_on_newline)
        # Prompts of several requests in one padded forward: worth it on a GPU, which one prompt
        # leaves idle; on a CPU the forward is compute-bound and padded batches ran slower than one
        # prompt at a time.
        self.batch_prefill = self.device.type != "cpu"
        # On a CPU a padded prefill past a few thousand tokens costs more per prompt than smaller
        # batches (results/bench/stage_scaling_1024.json).
        self.batch_tokens = batch_tokens
        self.prefill_model: torch.nn.Module | None = None
        self.prefill_dtype = self.use_prefill_dtype(prefill_dtype)

    # ---- the prompt forward ---------------------------------------------------------------
    def use_prefill_dtype(self, dtype: str = "auto") -> torch.dtype:
        """Run the prompt forward of every generation in `dtype` (`hardware.prefill_dtype`).

        On an AMX CPU a prompt forward is compute-bound and bfloat16 multiplies are several times
        faster, while one-token decode steps are bandwidth-bound and ran slower in bfloat16. So a
        bfloat16 copy of the decoder (no embedding table) prefills all prompt tokens but the last;
        the cache is cast back, and the last token and every decode step run in the model's float32,
        so logits and sampling stay float32 (results/bench/stage_scaling_*.json for the speed,
        results/bridge/eval_val_latent_bf16_prefill.json for the unchanged answers).
        """
        want = hardware.prefill_dtype(self.model, dtype, dense_cache=self.cache_factory is None)
        own = next(self.model.parameters()).dtype
        self.prefill_model = None if want == own else decoder_copy(self.model, want)
        self.prefill_dtype = want
        return want

    def prefill(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, logits_to_keep: int = 1):
        """The prompt forward into `cache`; returns the model output with the last `logits_to_keep`
        positions' logits (more than one only without the separate prefill copy)."""
        if self.prefill_model is not None and x.shape[1] > 1 and logits_to_keep == 1:
            self.prefill_model(inputs_embeds=x[:, :-1].to(self.prefill_dtype), attention_mask=mask[:, :-1],
                               position_ids=pos[:, :-1], past_key_values=cache, use_cache=True)
            own = x.dtype
            for layer in cache.layers:
                if getattr(layer, "keys", None) is not None:
                    layer.keys, layer.values = layer.keys.to(own), layer.values.to(own)
            return self.model(inputs_embeds=x[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                              past_key_values=cache, use_cache=True)
        return self.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=logits_to_keep)

    # ---- hidden states --------------------------------------------------------------------
    def check_layer(self, layer: int, what: str = "layer") -> None:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"{what}={layer} but {self.name} has layers 1..{self.num_layers}")

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states after `layer` decoder layers (T x d), without running the layers above."""
        return self.hidden_states_batch(input_ids[None], torch.ones_like(input_ids)[None], layer)[0]

    def hidden_states_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        self.check_layer(layer)
        captured, me = {}, threading.get_ident()

        def hook(_mod, _args, out):
            # hooks are per module, not per call: with concurrent callers (the serving threads),
            # only the hook of the thread that runs this forward may capture and stop it
            if threading.get_ident() != me:
                return None
            captured["h"] = out[0] if isinstance(out, tuple) else out
            raise _StopForward

        handle = self.model.model.layers[layer - 1].register_forward_hook(hook)
        try:
            self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"]

    @torch.no_grad()
    def hidden_states_many(self, jobs: list[tuple[torch.Tensor, int]], max_padding: float = 0.25,
                           padded: bool | None = None) -> list[torch.Tensor]:
        """`hidden_states` of several (input_ids, layer) jobs, prompts of one layer in shared forwards
        (`padded`, default `self.batch_prefill`), else one after another.

        Rows are right-padded: a causal model never lets a real token see the padding after it,
        and positions count from 0 as they do alone. Prompts are grouped by length so that padding
        adds at most `max_padding` of the real tokens to a forward.
        """
        if len(jobs) == 1 or not (self.batch_prefill if padded is None else padded):
            return [self.hidden_states(*job) for job in jobs]
        out: list[torch.Tensor | None] = [None] * len(jobs)
        for layer in sorted({layer for _, layer in jobs}):
            members = [i for i, (_, l) in enumerate(jobs) if l == layer]
            for g in length_groups(members, [len(jobs[i][0]) for i in members], max_padding):
                n = len(jobs[g[-1]][0])
                ids = torch.full((len(g), n), self.tok.pad_token_id or 0, dtype=torch.long, device=self.device)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(g):
                    ids[r, :len(jobs[i][0])] = jobs[i][0]
                    mask[r, :len(jobs[i][0])] = 1
                h = self.hidden_states_batch(ids, mask, layer)
                for r, i in enumerate(g):
                    out[i] = h[r, :len(jobs[i][0])]
        return out  # type: ignore[return-value]

    # ---- generation -----------------------------------------------------------------------
    def new_cache(self):
        if self.cache_factory is not None:
            return self.cache_factory(self.model)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int,
                 on_token: Callable[[str], None] | None = None, cache=None) -> Generation:
        """Greedy decoding from embeddings with an explicit attention mask and positions.

        A hand-written loop rather than `model.generate` so that prefill and decode are timed
        apart, tokens can be streamed, and a compressed cache whose length differs from the
        token position still gets the right positions.

        `cache`: a session's dense cache holding its earlier turns (latentwire.sessions). The prompt
        then continues it (positions and mask after its entries), and the turn's last token (the
        answer's end, or its last word when `max_new_tokens` cut it) is fed too, so the cache holds
        the whole turn for the next one.
        """
        n = inputs_embeds.shape[1]
        session = cache is not None
        cache = cache if session else self.new_cache()
        past = cache.get_seq_length() if session else 0
        # the cache hook: a cache may rework itself once the prompt is in (FMKVC refits its
        # super-tokens on the prompt's tail); it says how many positions' logits it reads, and gets
        # them after the prefill
        hook = getattr(cache, "after_prefill", None)
        tail = max(cache.tail_tokens(n), 1) if hook is not None else 1
        t0 = now_ms()
        mask = torch.ones(1, past + n, dtype=torch.long, device=self.device)
        pos = torch.arange(past, past + n, device=self.device)[None]
        if past:  # the prefill copy would append its own dtype to the cache's entries: the model's own forward
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True, logits_to_keep=tail)
        else:
            out = self.prefill(inputs_embeds, mask, pos, cache, logits_to_keep=tail)
        if hook is not None:
            hook(self.model, out, inputs_embeds=inputs_embeds)
        t1 = now_ms()
        ids: list[int] = []
        text_so_far = ""
        pos = past + n
        while True:
            nxt = int(out.logits[0, -1].argmax())
            if nxt in self.eos_ids:
                break
            ids.append(nxt)
            if on_token is not None:
                text = self.tok.decode(ids, skip_special_tokens=True)
                if len(text) > len(text_so_far):
                    on_token(text[len(text_so_far):])
                    text_so_far = text
            if len(ids) >= max_new_tokens:
                break
            past = cache.get_seq_length()
            out = self.model(input_ids=torch.tensor([[nxt]], device=self.device),
                             attention_mask=torch.ones(1, past + 1, dtype=torch.long, device=self.device),
                             position_ids=torch.tensor([[pos]], device=self.device),
                             past_key_values=cache, use_cache=True)
            pos += 1
        if session:
            self.model(input_ids=torch.tensor([[nxt]], device=self.device),
                       attention_mask=torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=self.device),
                       position_ids=torch.tensor([[pos]], device=self.device), past_key_values=cache, use_cache=True)
        t2 = now_ms()
        # a compressed cache reports tokens seen as its length (for positions); kv_lengths: entries held
        # per layer, of which the largest (a sliding-window layer holds fewer)
        held = max(cache.kv_lengths()) if hasattr(cache, "kv_lengths") else cache.get_seq_length()
        return Generation(self.tok.decode(ids, skip_special_tokens=True).strip(), ids, t1 - t0, t2 - t1, held)

    @torch.no_grad()
    def generate_batch(self, embeds: list[torch.Tensor], max_new_tokens: list[int]) -> list[Generation]:
        """Greedy decoding of several prompts (each L_i x d) together, left-padded.

        Positions count real tokens only (cumsum of the mask), so each row decodes exactly as it
        would alone; finished rows keep stepping (masked out of the result) until all are done.
        Prefill/decode times are those of the whole batch. Uses transformers' dense cache.
        """
        from transformers import DynamicCache

        b, d = len(embeds), embeds[0].shape[-1]
        lens = torch.tensor([e.shape[0] for e in embeds], device=self.device)
        n = int(lens.max())
        x = embeds[0].new_zeros(b, n, d)
        mask = torch.zeros(b, n, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            x[i, n - e.shape[0]:] = e
            mask[i, n - e.shape[0]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        t0 = now_ms()
        out = self.prefill(x, mask, pos, cache)
        t1 = now_ms()
        ids: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        nxt_pos = lens.clone()
        while True:
            nxt = out.logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in self.eos_ids:
                    done[i] = True
                    continue
                ids[i].append(t)
                done[i] = len(ids[i]) >= max_new_tokens[i]
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos[:, None],
                             past_key_values=cache, use_cache=True)
            nxt_pos += 1
        t2 = now_ms()
        return [Generation(self.tok.decode(r, skip_special_tokens=True).strip(), r, t1 - t0, t2 - t1,
                           # this row's own entries, as the one-by-one path would hold them
                           int(lens[i]) + len(r) - (len(r) >= max_new_tokens[i])) for i, r in enumerate(ids)]

    def generate_many(self, embeds: list[torch.Tensor], max_new_tokens: list[int]) -> list[Generation]:
        """`generate` of several prompts (each L_i x d): `generate_batch` over groups of similar
        length (a few soft tokens padded to a long context would cost a long prefill each) within
        `batch_tokens`; a group of one runs unpadded. A compressed cache holds one sequence, so with
        one the prompts run one after another, each as it would alone."""
        if len(embeds) == 1 or self.cache_factory is not None:
            return [self.generate(e[None], n) for e, n in zip(embeds, max_new_tokens)]
        out: list[Generation | None] = [None] * len(embeds)
        for g in length_groups(list(range(len(embeds))), [len(e) for e in embeds], max_tokens=self.batch_tokens):
            gens = self.generate_batch([embeds[i] for i in g], [max_new_tokens[i] for i in g]) if len(g) > 1 \
                else [self.generate(embeds[g[0]][None], max_new_tokens[g[0]])]
            for i, gen in zip(g, gens):
                out[i] = gen
        return out  # type: ignore[return-value]
