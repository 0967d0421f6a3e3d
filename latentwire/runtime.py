"""The agent runtime: what a source or target agent does with its model, free of Ray and gRPC.

Serving (`services/`) and evaluation/training (`bridge/`) call the same functions here, so a
prompt, primer or mask that differs between training and serving cannot happen by construction.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from latentwire import attention, profiles
from latentwire.errors import InvalidArgument, ResourceExhausted
from latentwire.settings import Limits

_SLOT = "\x00PAYLOAD\x00"  # where the packet goes inside the rendered target prompt

SOURCE_INSTRUCTION = ("Write a short message to another agent that passes on every fact it needs "
                      "to answer the question (names, numbers, places, dates). Reply with the message only.")


def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles (fast bfloat16 matrix multiplies)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix multiplies beat float32 here: a GPU, or a CPU with AMX tiles."""
    return torch.device(device).type == "cuda" or cpu_amx()


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


class AgentModel:
    """One model and its tokenizer, with the prompts of the LatentWire protocol."""

    def __init__(self, profile: str | profiles.ModelProfile, *, device: str = "cpu", dtype: str | None = None,
                 limits: Limits | None = None, model=None, tokenizer=None, cache_factory: Callable | None = None,
                 local_path: str | None = None, batch_tokens: int | None = None, prefill_dtype: str = "float32"):
        self.profile = profiles.get_profile(profile) if isinstance(profile, str) else profile
        if model is None:
            model, tokenizer = profiles.load(self.profile, device=device, dtype=dtype, local_path=local_path)
            attention.enable(model)  # a model of our own: long prompts skip the pairs their masks drop
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.limits = limits or Limits()
        self.cache_factory = cache_factory  # e.g. an FMKVC cache; None: transformers' DynamicCache
        cfg = model.config.get_text_config()
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.embed = model.get_input_embeddings()
        self.eos_ids = self._eos_ids()
        self._prefix_cache: dict[str, torch.Tensor] = {}
        # Source prefill of several prompts in one padded forward: worth it on a GPU, which one
        # prompt leaves idle; on a CPU the forward is compute-bound and padded batches ran slower
        # than one prompt at a time (8 SmolLM2 prompts of ~1100 tokens: 8.4 s vs 6.1 s).
        self.batch_prefill = self.device.type != "cpu"
        # Padded tokens one batched generation may prefill (None: no bound). On a CPU a padded
        # prefill past a few thousand tokens costs more per prompt than smaller batches
        # (results/bench/stage_scaling_1024.json: 1.53 s per 1024-token prompt at batch 4, 1.83 s at 8).
        self.batch_tokens = batch_tokens
        self._embed_rms: float | None = None
        self._prefill_model = None
        self.prefill_dtype = self.use_prefill_dtype(prefill_dtype)

    def use_prefill_dtype(self, dtype: str = "auto") -> torch.dtype:
        """Run the prompt forward of every generation in `dtype` ("float32", "bfloat16", or "auto":
        bfloat16 for a float32 model on an AMX CPU when the copy fits in memory, else the model's own dtype).

        On an AMX CPU a prompt forward is compute-bound and bfloat16 multiplies are several times
        faster, while one-token decode steps are bandwidth-bound and ran slower in bfloat16. So a
        bfloat16 copy of the decoder (no embedding table) prefills all prompt tokens but the last;
        the cache is cast back, and the last token and every decode step run in the model's float32,
        so logits and sampling stay float32. Gemma 3 270M on 2 AMX cores: 389 -> 178 ms for a
        256-token prompt, 1281 -> 487 ms for 1024 (results/bench/stage_scaling_*.json); held-out
        LATENT EM unchanged at 0.88 (results/bridge/eval_val_latent_bf16_prefill.json).
        Only with the dense cache: FMKVC's sidecar compresses float32 keys.
        """
        own = next(self.model.parameters()).dtype
        if dtype == "auto":
            amx = self.device.type == "cpu" and cpu_amx()
            want = torch.bfloat16 if (amx and own == torch.float32 and self.cache_factory is None
                                      and self._copy_fits()) else own
        elif dtype in ("float32", "bfloat16"):
            want = getattr(torch, dtype)
        else:
            raise ValueError(f"prefill dtype must be float32, bfloat16 or auto, not {dtype!r}")
        if want != own and self.cache_factory is not None:
            raise ValueError(f"prefill dtype {dtype} needs the dense cache (a compressed cache's sidecar "
                             f"works in the model's {str(own).removeprefix('torch.')})")
        self._prefill_model = None if want == own else self._decoder_copy(want)
        return want

    def _copy_fits(self, share: float = 0.25) -> bool:
        """Whether a bfloat16 decoder copy takes under `share` of the memory available now: "auto"
        must not turn a float32 8B model on a CPU host into an out-of-memory replica."""
        import psutil

        table = self.model.get_input_embeddings().weight.numel()
        copy_bytes = 2 * (sum(p.numel() for p in self.model.get_decoder().parameters()) - table)
        return copy_bytes < share * psutil.virtual_memory().available

    def _decoder_copy(self, dtype: torch.dtype):
        decoder = self.model.get_decoder()
        table = decoder.get_input_embeddings()
        decoder.set_input_embeddings(None)  # prompts arrive as embeddings: no second table
        try:
            fast = copy.deepcopy(decoder)
        finally:
            decoder.set_input_embeddings(table)
        for p in fast.parameters():  # parameters only: buffers such as RoPE's inv_freq stay float32
            p.data = p.data.to(dtype)
            p.requires_grad_(False)
        return fast.eval()

    def _prefill(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, logits_to_keep: int = 1):
        """The prompt forward into `cache`; returns the model output with the last `logits_to_keep`
        positions' logits (more than one only without the separate prefill copy)."""
        if self._prefill_model is not None and x.shape[1] > 1 and logits_to_keep == 1:
            self._prefill_model(inputs_embeds=x[:, :-1].to(self.prefill_dtype), attention_mask=mask[:, :-1],
                                position_ids=pos[:, :-1], past_key_values=cache, use_cache=True)
            own = x.dtype
            for layer in cache.layers:
                if getattr(layer, "keys", None) is not None:
                    layer.keys, layer.values = layer.keys.to(own), layer.values.to(own)
            return self.model(inputs_embeds=x[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                              past_key_values=cache, use_cache=True)
        return self.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=logits_to_keep)

    @property
    def name(self) -> str:
        return self.profile.name

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for x in [self.tok.eos_token_id, gen_eos]:
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, list):
                ids.update(x)
        for t in ["<|im_end|>", "<end_of_turn>", "<eos>", "</s>"]:
            tid = self.tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.tok.unk_token_id and tid is not None:
                ids.add(tid)
        if self.profile.stop_on_newline:
            ids.update(i for i in self.tok.convert_tokens_to_ids(["\n", "Ċ", "\n\n"]) if isinstance(i, int)
                       and i != self.tok.unk_token_id)
        return ids

    # ---- shared helpers -------------------------------------------------------------------
    def tokenize(self, text: str) -> torch.Tensor:
        return self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0].to(self.device)

    def render(self, user: str, system: str | None = None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def embed_rms(self) -> float:
        """RMS of the input embeddings of real text: the scale soft tokens must match."""
        if self._embed_rms is None:
            from latentwire.textdata import text_chunks

            ids = self.tokenize(" ".join(text_chunks(8)))[:2048]
            with torch.no_grad():
                e = self.embed(ids[None]).float()
            self._embed_rms = float(e.pow(2).mean(-1).sqrt().mean())
        return self._embed_rms

    # ---- source side ----------------------------------------------------------------------
    def source_ids(self, context: str, question: str) -> torch.Tensor:
        """Token ids of what the source reads (the same prompt for LATENT and TEXT)."""
        return self.source_prompt(context, question)[0]

    def source_prompt(self, context: str, question: str) -> tuple[torch.Tensor, slice]:
        """`source_ids` and the slice of its tokens that spell the context.

        A LATENT packet carries the states of the context tokens only: the template, instruction
        and question are the same for every request or reach the target as text anyway. An empty
        context has no tokens of its own; the whole prompt is sent then, so a packet is never empty.
        """
        ids, span, _ = self.source_spans(context, question)
        return ids, span

    def source_spans(self, context: str, question: str) -> tuple[torch.Tensor, slice, slice]:
        """`source_prompt` and the slice of the tokens from the question to the end of the prompt
        (the question and the template after it: the rows a selector reads attention from)."""
        if len(question) > self.limits.max_question_chars:
            raise InvalidArgument(f"{len(question)} characters exceed the limit of "
                                  f"{self.limits.max_question_chars}", "question")
        text, (c0, c1) = self.source_text(context, question)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc.input_ids, dtype=torch.long, device=self.device)
        if len(ids) > self.limits.max_context_tokens:
            raise ResourceExhausted(f"{len(ids)} tokens exceed the configured limit of "
                                    f"{self.limits.max_context_tokens} (max_context_tokens)", "context")
        inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < c1 and b > c0]
        span = slice(inside[0], inside[-1] + 1) if c0 >= 0 and context and inside else slice(0, len(ids))
        q0 = text.rfind(question) if question else -1
        after = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and b > max(q0, c1)]
        asked = slice(after[0], len(ids)) if q0 >= 0 and after else slice(len(ids) - 1, len(ids))
        return ids, span, asked

    def source_text(self, context: str, question: str) -> tuple[str, tuple[int, int]]:
        """The source prompt as text and the character span of the context in it (-1 if the chat
        template changed the context)."""
        user = f"{context}\n\nQuestion: {question}"
        text = self.render(user, SOURCE_INSTRUCTION)
        c0 = text.rfind(user)
        return text, (c0, c0 + len(context) if c0 >= 0 else -1)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states after `layer` decoder layers (T x d), without running the layers above."""
        return self.hidden_states_batch(input_ids[None], torch.ones_like(input_ids)[None], layer)[0]

    def check_layer(self, layer: int, what: str = "layer") -> None:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"{what}={layer} but {self.name} has layers 1..{self.num_layers}")

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

    def write_messages(self, jobs: list[tuple[torch.Tensor, int]]) -> list[Generation]:
        """`write_message` for several (input_ids, max_tokens) jobs in one batched generation."""
        if len(jobs) == 1 or self.cache_factory is not None:  # generate_batch holds a dense cache only
            return [self.write_message(*job) for job in jobs]
        with torch.no_grad():
            embeds = [self.embed(ids.to(self.device)[None])[0] for ids, _ in jobs]
        return self._generate_grouped(embeds, [n for _, n in jobs])

    def write_message(self, input_ids: torch.Tensor, max_tokens: int) -> Generation:
        """Text relay: the source writes its message to the target, at most `max_tokens` tokens."""
        embeds = self.embed(input_ids[None])
        return self.generate(embeds, max_tokens)

    # ---- target side ----------------------------------------------------------------------
    def _target_template(self, question: str) -> tuple[str, str]:
        text = self.render(f"{self.profile.primer}{_SLOT}\n\nQuestion: {question}\nAnswer in a few words.")
        prefix, suffix = text.split(_SLOT)
        return prefix, suffix

    def prefix_embeds(self) -> torch.Tensor:
        """Template + primer before the payload: identical for every request, so embedded once."""
        if "prefix" not in self._prefix_cache:
            prefix, _ = self._target_template("?")
            with torch.no_grad():
                self._prefix_cache["prefix"] = self.embed(self.tokenize(prefix)[None])[0]
        return self._prefix_cache["prefix"]

    def payload_embeds(self, payload: torch.Tensor | str | None) -> torch.Tensor:
        """Soft tokens (K x d float) | text | its token ids (1-D long, already tokenised) | None."""
        if payload is None:
            return self.prefix_embeds()[:0]
        if isinstance(payload, str):
            payload = self.tokenize(payload)
        if not payload.is_floating_point():
            return self.embed(payload.to(self.device)[None])[0] if len(payload) else self.prefix_embeds()[:0]
        if payload.ndim != 2 or payload.shape[-1] != self.hidden_size:
            raise InvalidArgument(f"soft tokens must be (K, {self.hidden_size}), got {tuple(payload.shape)}",
                                  "soft_tokens")
        return payload.to(device=self.device, dtype=self.prefix_embeds().dtype)

    def target_inputs(self, payload: torch.Tensor | str | None, question: str) -> torch.Tensor:
        """[template+primer] + payload (soft tokens | message | context | nothing) + [question]: (1, L, d)."""
        _, suffix = self._target_template(question)
        parts = [self.prefix_embeds(), self.payload_embeds(payload), self.embed(self.tokenize(suffix)[None])[0]]
        return torch.cat(parts, 0)[None]

    def answer(self, payload: torch.Tensor | str | None, question: str, max_new_tokens: int,
               on_token: Callable[[str], None] | None = None) -> Generation:
        with torch.no_grad():
            embeds = self.target_inputs(payload, question)
        return self.generate(embeds, max_new_tokens, on_token=on_token)

    def answer_batch(self, jobs: list[tuple[torch.Tensor | str | None, str, int]]) -> list[Generation]:
        """Answer several (payload, question, max_new_tokens) at once: one batched generation
        (with a compressed KV cache, one after another in this call, not in competing threads)."""
        if len(jobs) == 1 or self.cache_factory is not None:  # a compressed cache holds one sequence
            return [self.answer(*job) for job in jobs]
        with torch.no_grad():
            embeds = [self.target_inputs(payload, question)[0] for payload, question, _ in jobs]
        return self._generate_grouped(embeds, [n for _, _, n in jobs])

    def _generate_grouped(self, embeds: list[torch.Tensor], max_new_tokens: list[int]) -> list[Generation]:
        """`generate_batch` over groups of similar length (a few soft tokens padded to a long DIRECT
        context would cost a long prefill each) within `batch_tokens`; a group of one runs unpadded."""
        out: list[Generation | None] = [None] * len(embeds)
        for g in length_groups(list(range(len(embeds))), [len(e) for e in embeds], max_tokens=self.batch_tokens):
            gens = self.generate_batch([embeds[i] for i in g], [max_new_tokens[i] for i in g]) if len(g) > 1 \
                else [self.generate(embeds[g[0]][None], max_new_tokens[g[0]])]
            for i, gen in zip(g, gens):
                out[i] = gen
        return out  # type: ignore[return-value]

    # ---- generation -----------------------------------------------------------------------
    def new_cache(self):
        if self.cache_factory is not None:
            return self.cache_factory(self.model)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int,
                 on_token: Callable[[str], None] | None = None) -> Generation:
        """Greedy decoding from embeddings with an explicit attention mask and positions.

        A hand-written loop rather than `model.generate` so that prefill and decode are timed
        apart, tokens can be streamed, and a compressed cache whose length differs from the
        token position still gets the right positions.
        """
        n = inputs_embeds.shape[1]
        cache = self.new_cache()
        # a cache may rework itself once the prompt is in (FMKVC refits its super-tokens on the prompt's
        # tail): it says how many positions' logits it reads, and gets them after the prefill
        hook = getattr(cache, "after_prefill", None)
        tail = max(cache.tail_tokens(n), 1) if hook is not None else 1
        t0 = now_ms()
        out = self._prefill(inputs_embeds, torch.ones(1, n, dtype=torch.long, device=self.device),
                            torch.arange(n, device=self.device)[None], cache, logits_to_keep=tail)
        if hook is not None:
            hook(self.model, out, inputs_embeds=inputs_embeds)
        t1 = now_ms()
        ids: list[int] = []
        text_so_far = ""
        pos = n
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
        t2 = now_ms()
        # a compressed cache reports tokens seen as its length (for positions); kv_lengths: entries held
        held = cache.kv_lengths()[0] if hasattr(cache, "kv_lengths") else cache.get_seq_length()
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
        out = self._prefill(x, mask, pos, cache)
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
