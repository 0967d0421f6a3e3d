"""Which context tokens a message of at most M tokens carries: the source's choice, knowing the question.

One budget M (`message_tokens`) bounds every message between agents. A LATENT packet carries the
states of at most M context tokens (the bridge turns each into one soft token), and the extractive
text relay (`EXTRACT`) sends the same M tokens as text; a selector decides which. The source reads
context and question together, so it can spend the budget on what the question needs:

- `attention`: the source's own attention from the question to the context at one layer. Each
  context token is scored by the attention mass the question's tokens (and the prompt's tail) give
  it, averaged over heads; the best-scored tokens are anchors, each taking `before` tokens before
  it and `after` after it, until M are chosen.
- `lexical`: anchors are context tokens that spell a content word of the question, rarest in the
  context first, each with the tokens after it (the crude probe the budget issue describes).
- `prefix`: the first M context tokens (what truncation sends; the floor of any selector).
- `merge` (latentwire.merging, registered when that module is imported, as the source agent and
  `latentwire eval` do): `lexical`'s windows with light tokens sharing a slot with a neighbour, so
  that M soft tokens cover more than M context tokens (LATENT only).

Selectors are registered by name (`SELECTORS`); a new one is one class and its registration.
Selected positions are returned in context order: the target reads the chosen tokens as they
stood, and windows that touch are one run of text.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass

import torch

from latentwire.registry import Registry

SELECTORS: Registry[type["Selector"]] = Registry("packet selector")

_STOP = set("""a an the of in on at to for from by with and or is are was were be been do does did what which who
whom whose when where why how that this these those it its as into than then there their they he she his her him
has have had not no yes can could would should will about after before many much number name called""".split())


@dataclass
class SourceView:
    """What a selector may read of one source prompt: the tokens, where the context and the
    question are in them, and (for attention selectors) the question-to-context attention."""

    ids: torch.Tensor  # (T,) the whole source prompt
    context: slice  # the context's tokens in `ids`
    question: slice  # the question's tokens (and what follows them) in `ids`
    tokens: list[str]  # each context token's text (decoded alone), for lexical matching
    question_text: str
    attention: torch.Tensor | None = None  # (n_context,) attention mass from the question


@dataclass
class Selector:
    """Base of every selector: which context tokens (indices into the context) a budget of M keeps."""

    before: int = 0  # tokens kept before each anchor
    after: int = 12  # tokens kept after each anchor
    needs_attention_layer: int | None = None  # a source layer whose attention `score` reads
    # a class flag: whether its messages put several tokens in one slot (`plan`, latentwire.merging)
    merges_slots = False

    def score(self, view: SourceView) -> torch.Tensor:
        """(n_context,) anchor scores; higher first. Tokens scoring -inf never anchor."""
        raise NotImplementedError

    def select(self, view: SourceView, budget: int) -> list[int]:
        n = view.context.stop - view.context.start
        if budget >= n:
            return list(range(n))
        return windows(self.score(view), budget, self.before, self.after)


def windows(scores: torch.Tensor, budget: int, before: int, after: int) -> list[int]:
    """Positions of the best anchors with their neighbours, at most `budget` in all, in order.

    Anchors are taken best first; each adds the positions from `before` before it to `after` after
    it that are not chosen yet, the last one cut to the budget. Anchors left over (all scores
    -inf or windows overlapping) leave the budget partly unspent only when nothing else can anchor;
    then the earliest unchosen positions fill it, so a packet always holds min(M, n) tokens.
    """
    n = len(scores)
    chosen: set[int] = set()
    for a in torch.argsort(scores, descending=True, stable=True).tolist():
        if len(chosen) >= budget or scores[a] == float("-inf"):
            break
        for p in range(max(0, a - before), min(n, a + after + 1)):
            if p not in chosen:
                chosen.add(p)
                if len(chosen) >= budget:
                    break
    for p in range(n):
        if len(chosen) >= budget:
            break
        chosen.add(p)
    return sorted(chosen)


@SELECTORS.register("prefix")
@dataclass
class PrefixSelector(Selector):
    """The first M context tokens: truncation, what a budget costs a source that does not choose."""

    def score(self, view: SourceView) -> torch.Tensor:
        n = view.context.stop - view.context.start
        return -torch.arange(n, dtype=torch.float32)

    def select(self, view: SourceView, budget: int) -> list[int]:
        return list(range(min(budget, view.context.stop - view.context.start)))


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in _STOP}


@SELECTORS.register("lexical")
@dataclass
class LexicalSelector(Selector):
    """Context tokens that spell a word of the question (not a stop word), rarest in the context
    first, each with the `after` tokens that follow it: where a record about the asked entity is."""

    names_weight: float = 4.0  # a capitalised question word (a name) outranks a common one this much

    def score(self, view: SourceView) -> torch.Tensor:
        words = content_words(view.question_text)
        # names: capitalised words of the question other than its first
        names = {w.lower() for w in re.findall(r"(?<=\s)[A-Z][a-z0-9]+", view.question_text)} & words
        text, owner = spell(view.tokens)
        hits = [(m.start(), m.group().lower()) for m in re.finditer(r"[A-Za-z0-9]+", text) if m.group().lower() in words]
        counts: dict[str, int] = {}
        for _, w in hits:
            counts[w] = counts.get(w, 0) + 1
        scores = torch.full((len(view.tokens),), float("-inf"))
        for at, w in hits:  # the word's first token anchors; rarer words first, names before the rest
            scores[owner[at]] = max(float(scores[owner[at]]), (self.names_weight if w in names else 1.0) / counts[w])
        return scores


def spell(tokens: list[str]) -> tuple[str, list[int]]:
    """The text the tokens spell (byte-level "Ġ" and SentencePiece "▁" read as spaces) and, for each
    character, the index of the token it came from: words are found in the text, not in the pieces
    a tokenizer cut them into ("O" + "mar")."""
    text, owner = [], []
    for i, t in enumerate(tokens):
        piece = t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
        text.append(piece)
        owner += [i] * len(piece)
    return "".join(text), owner


@SELECTORS.register("attention")
@dataclass
class AttentionSelector(Selector):
    """The source's attention from the question to the context at layer `needs_attention_layer`,
    the anchors' neighbours with them (`before`, `after`)."""

    before: int = 2
    after: int = 8
    needs_attention_layer: int | None = 24  # SmolLM2: the best of layers 4-28 on training items (results/budget/README.md)

    def score(self, view: SourceView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("the attention selector needs the source's attention (SourceView.attention)")
        return view.attention.float()


def make_selector(method: str, **params) -> Selector:
    """A registered selector by name with its parameters; an unknown parameter names itself."""
    cls = SELECTORS.get(method)
    fields = set(cls.__dataclass_fields__)
    bad = sorted(set(params) - fields)
    if bad:
        raise ValueError(f"packet selector {method!r} takes {sorted(fields)}, not {bad}")
    return cls(**params)


# ---- reading the source's attention ---------------------------------------------------------
class _Stop(Exception):
    pass


def _rotary(module):
    """The `apply_rotary_pos_emb` of the module's own modelling file (Llama, Mistral, Gemma, Qwen)."""
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no apply_rotary_pos_emb: attention selection "
                         f"supports rotary attention layers only")
    return fn


@torch.no_grad()
def question_attention(model, ids: torch.Tensor, queries: slice, keys: slice, attn_layer: int,
                       state_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention mass from the `queries` rows to the `keys` columns of `ids` at decoder layer
    `attn_layer` (1-based, as `AgentModel.hidden_states`), mean over heads, summed over queries:
    (len(keys),). With `state_layer`, also the hidden states after that many layers (T x d) from the
    same forward, which stops at the deeper of the two layers.

    The scores are recomputed from the layer's input with its own projections and rotary
    embedding, so they do not depend on the attention kernel the model runs (SDPA keeps no weights).
    """
    layers = model.model.model.layers
    model.check_layer(attn_layer, "attention layer")
    last = max(attn_layer, state_layer or 0)
    me, got = threading.get_ident(), {}
    attn = layers[attn_layer - 1].self_attn

    def pre(mod, args, kwargs):
        if threading.get_ident() != me:  # hooks are per module: only this call's thread captures
            return None
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        hd = mod.head_dim
        q = mod.q_proj(h[:, queries]).view(1, -1, mod.config.num_attention_heads, hd).transpose(1, 2)
        k = mod.k_proj(h).view(1, h.shape[1], -1, hd).transpose(1, 2)
        if getattr(mod, "q_norm", None) is not None:
            q, k = mod.q_norm(q), mod.k_norm(k)
        q, _ = _rotary(mod)(q, q, cos[:, queries], sin[:, queries])
        _, k = _rotary(mod)(k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * mod.scaling  # (1, H, Q, T)
        rows = torch.arange(queries.start, queries.stop, device=h.device)[:, None]
        logits = logits.masked_fill(torch.arange(h.shape[1], device=h.device)[None] > rows, float("-inf"))
        got["attention"] = logits.softmax(-1)[0, :, :, keys].mean(0).sum(0)
        return None

    def post(mod, _args, out):
        if threading.get_ident() != me:
            return None
        if mod is layers[(state_layer or 0) - 1]:
            got["states"] = out[0] if isinstance(out, tuple) else out
        if mod is layers[last - 1]:
            raise _Stop  # nothing above is needed
        return None

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True)]
    if state_layer:
        model.check_layer(state_layer)
    for i in {last, state_layer or last}:
        handles.append(layers[i - 1].register_forward_hook(post))
    try:
        model.model.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], use_cache=False)
    except _Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()
    states = got.get("states")
    return got["attention"], (states[0] if states is not None else None)


# ---- one message --------------------------------------------------------------------------
@dataclass
class Message:
    """The source's plan for one message: its prompt, and the context tokens the budget keeps."""

    ids: torch.Tensor  # (T,) the source prompt
    context: slice  # the context's tokens in `ids`
    positions: torch.Tensor  # (K,) positions in `ids` of the kept tokens, in order; K <= budget unless merged
    states: torch.Tensor | None = None  # (K, d) hidden states of the kept tokens at the state layer
    # a merging selector's slots (latentwire.merging.merge_slots): each kept token's slot (K,), in
    # order, at most `budget` of them, and its weight in that slot (K,); None: one token per slot
    slot_of: torch.Tensor | None = None
    slot_weight: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return len(self.positions) if self.slot_of is None else int(self.slot_of.max()) + 1 if len(self.slot_of) else 0

    @property
    def token_ids(self) -> torch.Tensor:
        return self.ids[self.positions]


def plan_message(agent, context: str, question: str, budget: int | None, selector: Selector,
                 state_layer: int | None = None) -> Message:
    """Read the prompt once (up to the deeper of the selector's attention layer and `state_layer`),
    choose at most `budget` context tokens (None: all of them) and keep their states."""
    return plan_prompt(agent, agent.source_spans(context, question), question, budget, selector, state_layer)


Prompt = tuple[torch.Tensor, slice, slice]  # `AgentModel.source_spans`: ids, context, question


def plan_prompt(agent, prompt: Prompt, question: str, budget: int | None, selector: Selector,
                state_layer: int | None = None) -> Message:
    """`plan_message` of a prompt already tokenised (and checked against the limits)."""
    ids, span, asked = prompt
    layer = selector.needs_attention_layer if budget is not None and budget < span.stop - span.start else None
    attention, states = (question_attention(agent, ids, asked, span, layer, state_layer) if layer
                         else (None, agent.hidden_states(ids, state_layer) if state_layer else None))
    return keep_tokens(agent, prompt, question, budget, selector, attention, states)


def keep_tokens(agent, prompt: Prompt, question: str, budget: int | None, selector: Selector,
                attention: torch.Tensor | None, states: torch.Tensor | None) -> Message:
    """The message of a prompt already read: the selector's choice of at most `budget` context
    tokens (None: all) given the attention it needs, with their rows of `states` (T x d) if any.

    A merging selector (latentwire.merging) plans at most `budget` slots of more tokens for a message
    with states (LATENT: the bridge merges their soft tokens); a message without states is text
    (EXTRACT), which cannot merge, and gets the selector's `select`: at most `budget` tokens."""
    ids, span, asked = prompt
    n = span.stop - span.start
    slot_of = slot_weight = None
    if budget is None or budget >= n:
        keep = list(range(n))
    else:
        view = SourceView(ids=ids, context=span, question=asked, question_text=question, attention=attention,
                          tokens=agent.tok.convert_ids_to_tokens(ids[span].tolist()))
        if selector.merges_slots and states is not None:  # slots are merged soft tokens: LATENT only
            keep, slots = selector.plan(view, budget)
            slot_of = torch.tensor([s for s, group in enumerate(slots) for _ in group], dtype=torch.long)
            slot_weight = torch.tensor(selector.slot_weights(view, keep, slots), dtype=torch.float32)
        else:
            keep = selector.select(view, budget)
    positions = torch.tensor(keep, dtype=torch.long, device=ids.device) + span.start
    return Message(ids, span, positions, states[positions] if states is not None else None, slot_of, slot_weight)


def extract_text(agent, message: Message) -> str:
    """The kept tokens as text (the extractive relay): each run of adjacent tokens decoded as it
    stood, runs joined by an ellipsis so that the reader sees where text was left out. A merged
    message (more tokens than slots) has no text of its budget: refused."""
    if message.slot_of is not None:
        raise ValueError("a message whose slots merge tokens has no extractive text within its budget")
    pos = message.positions.tolist()
    runs: list[list[int]] = []
    for p in pos:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return " ... ".join(agent.tok.decode(message.ids[r].tolist(), skip_special_tokens=True).strip() for r in runs)


def plan_messages(agent, jobs: list[tuple[Prompt, str, int | None, int | None]], selector: Selector) -> list[Message]:
    """`plan_prompt` of several (prompt, question, budget, state_layer) jobs, for a batcher: one
    after another (each reads its own attention), or, for a selector that reads no attention, with
    the states of all prompts from `agent.hidden_states_many` (shared padded forwards on a GPU)."""
    if selector.needs_attention_layer is not None or len(jobs) == 1:
        return [plan_prompt(agent, prompt, q, budget, selector, layer) for prompt, q, budget, layer in jobs]
    want = [i for i, job in enumerate(jobs) if job[3]]
    states = dict(zip(want, agent.hidden_states_many([(jobs[i][0][0], jobs[i][3]) for i in want])))
    return [keep_tokens(agent, prompt, q, budget, selector, None, states.get(i))
            for i, (prompt, q, budget, _) in enumerate(jobs)]
