"""The agent runtime: what a source or target agent does with its model, free of Ray and gRPC.

`AgentModel` is one model and its tokenizer with two parts: the LatentWire prompt protocol
(`latentwire.prompts.PromptProtocol`: the source prompt and its spans, the target template, primer
and payload) and the generation engine (`latentwire.engine.Engine`: greedy generation from
embeddings, batching, the prefill copy, hidden-state capture, the cache hook). Serving (`services/`)
and evaluation/training (`bridge/`) call the same methods here, so a prompt, primer or mask that
differs between training and serving cannot happen by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentwire import attention, profiles
from latentwire.engine import Engine, Generation, length_groups, now_ms
from latentwire.hardware import cpu_amx, fast_bfloat16
from latentwire.prompts import SOURCE_INSTRUCTION, PromptProtocol
from latentwire.settings import Limits

# what callers import from here
__all__ = ["AgentModel", "Generation", "SOURCE_INSTRUCTION", "cpu_amx", "fast_bfloat16", "length_groups", "now_ms"]


class AgentModel:
    """One model and its tokenizer, with the prompts of the LatentWire protocol (`self.prompts`)
    and the engine that generates from them (`self.engine`)."""

    def __init__(self, profile: str | profiles.ModelProfile, *, device: str = "cpu", dtype: str | None = None,
                 limits: Limits | None = None, model=None, tokenizer=None, cache_factory: Callable | None = None,
                 local_path: str | None = None, batch_tokens: int | None = None, prefill_dtype: str = "float32"):
        self.profile = profiles.get_profile(profile) if isinstance(profile, str) else profile
        if model is None:
            model, tokenizer = profiles.load(self.profile, device=device, dtype=dtype, local_path=local_path)
            attention.enable(model)  # a model of our own: long prompts skip the pairs their masks drop
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        cfg = model.config.get_text_config()
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.embed = model.get_input_embeddings()
        self.prompts = PromptProtocol(self.profile, tokenizer, self.embed, hidden_size=self.hidden_size,
                                      device=self.device, limits=limits)
        # cache_factory: e.g. an FMKVC cache; None: transformers' DynamicCache
        self.engine = Engine(model, tokenizer, name=self.profile.name, stop_on_newline=self.profile.stop_on_newline,
                             cache_factory=cache_factory, batch_tokens=batch_tokens, prefill_dtype=prefill_dtype)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def limits(self) -> Limits:
        return self.prompts.limits

    # the engine's settings, read (and `eos_ids` set: tests and benchmarks decode a fixed budget) here
    @property
    def eos_ids(self) -> set[int]:
        return self.engine.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self.engine.eos_ids = ids

    @property
    def cache_factory(self) -> Callable | None:
        return self.engine.cache_factory

    @property
    def batch_prefill(self) -> bool:
        return self.engine.batch_prefill

    @property
    def batch_tokens(self) -> int | None:
        return self.engine.batch_tokens

    @property
    def prefill_dtype(self) -> torch.dtype:
        return self.engine.prefill_dtype

    def use_prefill_dtype(self, dtype: str = "auto") -> torch.dtype:
        """`Engine.use_prefill_dtype`: the dtype of every generation's prompt forward."""
        return self.engine.use_prefill_dtype(dtype)

    # ---- the prompt protocol --------------------------------------------------------------
    def tokenize(self, text: str) -> torch.Tensor:
        return self.prompts.tokenize(text)

    def render(self, user: str, system: str | None = None) -> str:
        return self.prompts.render(user, system)

    def embed_rms(self) -> float:
        return self.prompts.embed_rms()

    def source_ids(self, context: str, question: str) -> torch.Tensor:
        return self.prompts.source_ids(context, question)

    def source_prompt(self, context: str, question: str) -> tuple[torch.Tensor, slice]:
        return self.prompts.source_prompt(context, question)

    def source_spans(self, context: str, question: str) -> tuple[torch.Tensor, slice, slice]:
        return self.prompts.source_spans(context, question)

    def source_text(self, context: str, question: str) -> tuple[str, tuple[int, int]]:
        return self.prompts.source_text(context, question)

    def prefix_embeds(self) -> torch.Tensor:
        return self.prompts.prefix_embeds()

    def payload_embeds(self, payload: torch.Tensor | str | None) -> torch.Tensor:
        return self.prompts.payload_embeds(payload)

    def target_inputs(self, payload: torch.Tensor | str | None, question: str) -> torch.Tensor:
        return self.prompts.target_inputs(payload, question)

    # ---- the engine -----------------------------------------------------------------------
    def check_layer(self, layer: int, what: str = "layer") -> None:
        self.engine.check_layer(layer, what)

    def hidden_states(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        return self.engine.hidden_states(input_ids, layer)

    def hidden_states_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        return self.engine.hidden_states_batch(input_ids, attention_mask, layer)

    def hidden_states_many(self, jobs: list[tuple[torch.Tensor, int]], max_padding: float = 0.25,
                           padded: bool | None = None) -> list[torch.Tensor]:
        return self.engine.hidden_states_many(jobs, max_padding, padded)

    def new_cache(self):
        return self.engine.new_cache()

    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int,
                 on_token: Callable[[str], None] | None = None, cache=None) -> Generation:
        """`Engine.generate`; with `cache` (a session's) the prompt continues it."""
        return self.engine.generate(inputs_embeds, max_new_tokens, on_token=on_token, cache=cache)

    def generate_batch(self, embeds: list[torch.Tensor], max_new_tokens: list[int]) -> list[Generation]:
        return self.engine.generate_batch(embeds, max_new_tokens)

    # ---- what an agent does ---------------------------------------------------------------
    def write_message(self, input_ids: torch.Tensor, max_tokens: int) -> Generation:
        """Text relay: the source writes its message to the target, at most `max_tokens` tokens."""
        embeds = self.embed(input_ids[None])
        return self.engine.generate(embeds, max_tokens)

    def write_messages(self, jobs: list[tuple[torch.Tensor, int]]) -> list[Generation]:
        """`write_message` for several (input_ids, max_tokens) jobs in one batched generation."""
        with torch.no_grad():
            embeds = [self.embed(ids.to(self.device)[None])[0] for ids, _ in jobs]
        return self.engine.generate_many(embeds, [n for _, n in jobs])

    def answer(self, payload: torch.Tensor | str | None, question: str, max_new_tokens: int,
               on_token: Callable[[str], None] | None = None) -> Generation:
        with torch.no_grad():
            embeds = self.prompts.target_inputs(payload, question)
        return self.engine.generate(embeds, max_new_tokens, on_token=on_token)

    def answer_batch(self, jobs: list[tuple[torch.Tensor | str | None, str, int]]) -> list[Generation]:
        """Answer several (payload, question, max_new_tokens) at once: one batched generation
        (with a compressed KV cache, one after another in this call, not in competing threads)."""
        with torch.no_grad():
            embeds = [self.prompts.target_inputs(payload, question)[0] for payload, question, _ in jobs]
        return self.engine.generate_many(embeds, [n for _, _, n in jobs])
