"""The LatentWire prompt protocol: what a source agent reads and what a target agent answers from.

Source: the context and question under one instruction (`SOURCE_INSTRUCTION`); a LATENT packet
carries the states of the context's tokens (`source_spans`). Target: the chat template with the
profile's primer, then the payload (soft tokens, a text message, the context itself or nothing),
then the question (`target_inputs`). Serving, evaluation and training all build their prompts here,
so a prompt, primer or payload that differs between training and serving cannot happen.
"""

from __future__ import annotations

import torch

from latentwire import profiles
from latentwire.errors import InvalidArgument, ResourceExhausted
from latentwire.settings import Limits

_SLOT = "\x00PAYLOAD\x00"  # where the packet goes inside the rendered target prompt

SOURCE_INSTRUCTION = ("Write a short message to another agent that passes on every fact it needs "
                      "to answer the question (names, numbers, places, dates). Reply with the message only.")


class PromptProtocol:
    """The prompts of one model: its tokenizer and chat template, its input embeddings for the
    target's prompt, and the limits a source prompt must keep within."""

    def __init__(self, profile: profiles.ModelProfile, tok, embed: torch.nn.Module, *, hidden_size: int,
                 device: torch.device, limits: Limits | None = None):
        self.profile, self.tok, self.embed = profile, tok, embed
        self.hidden_size, self.device = hidden_size, device
        self.limits = limits or Limits()
        self._prefix: torch.Tensor | None = None
        self._embed_rms: float | None = None

    # ---- text ----------------------------------------------------------------------------
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

    # ---- target side ----------------------------------------------------------------------
    def target_template(self, question: str) -> tuple[str, str]:
        """The target prompt's text before and after the payload."""
        text = self.render(f"{self.profile.primer}{_SLOT}\n\nQuestion: {question}\nAnswer in a few words.")
        prefix, suffix = text.split(_SLOT)
        return prefix, suffix

    def prefix_embeds(self) -> torch.Tensor:
        """Template + primer before the payload: identical for every request, so embedded once."""
        if self._prefix is None:
            prefix, _ = self.target_template("?")
            with torch.no_grad():
                self._prefix = self.embed(self.tokenize(prefix)[None])[0]
        return self._prefix

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
        _, suffix = self.target_template(question)
        parts = [self.prefix_embeds(), self.payload_embeds(payload), self.embed(self.tokenize(suffix)[None])[0]]
        return torch.cat(parts, 0)[None]
