"""Agent sessions: a conversation's turns share one KV cache on the target, free of Ray and gRPC.

`Sessions` is the bounded table both sides keep per replica: at most `max_sessions` (a new one
evicts the least recently used), none idle for more than `idle_s` seconds, each one's turns counted
so that a turn that does not follow the last one is refused rather than answered from the wrong
history. Turn 0 starts a session (and drops an earlier one of the same id); turn N needs a session
that holds N turns: an unknown or expired id is NOT_FOUND, a turn count that differs is
FAILED_PRECONDITION, both naming `session_id`.

`SessionCaches` is the target's: each session holds a KV cache, and a turn appends its prompt
(template, primer, payload, question) and its answer, the answer's last token included, so the next
turn continues from it (`Engine.generate(cache=...)`). A turn that would take the session past
`max_tokens` entries is refused (RESOURCE_EXHAUSTED) before any work. A session's turns run one at
a time (its lock), alone rather than in a padded batch: a batched row would not hold its own cache.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latentwire.errors import FailedPrecondition, NotFound, ResourceExhausted, show
from latentwire.settings import SessionLimits

FIELD = "session_id"


@dataclass
class Session:
    id: str
    state: Any = None  # the target's KV cache; the source's turn log
    turns: int = 0
    tokens: int = 0  # KV entries of the session on the target
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Sessions:
    """Sessions by id, least recently used first, within `SessionLimits`. Thread-safe."""

    def __init__(self, limits: SessionLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits or SessionLimits(), clock
        self._items: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            self._expire()
            return session_id in self._items

    def _expire(self) -> None:
        cutoff = self.clock() - self.limits.idle_s
        for sid in [sid for sid, s in self._items.items() if s.last_used < cutoff]:
            del self._items[sid]

    def open(self, session_id: str, turn: int) -> Session:
        """The session that turn `turn` continues: a new one for turn 0, else the one holding `turn` turns."""
        if not session_id:
            raise FailedPrecondition("a session turn needs a session id", FIELD)
        with self._lock:
            self._expire()
            if turn == 0:
                self._items.pop(session_id, None)
                while len(self._items) >= self.limits.max_sessions:
                    self._items.popitem(last=False)
                s = self._items[session_id] = Session(session_id, last_used=self.clock())
                return s
            s = self._items.get(session_id)
            if s is None:
                raise NotFound(f"unknown or expired session {show(session_id)} (turn {turn} continues a session; "
                               f"turn 0 starts one)", FIELD)
            check_turn(s, turn)
            s.last_used = self.clock()
            self._items.move_to_end(session_id)
            return s

    def evict(self, session_id: str, only: Session | None = None) -> bool:
        """Drop the session (with `only`: if it is still that one, not a newer one of the same id)."""
        with self._lock:
            s = self._items.get(session_id)
            if s is None or (only is not None and s is not only):
                return False
            del self._items[session_id]
            return True

    def check_room(self, s: Session, more_tokens: int) -> None:
        if s.tokens + more_tokens > self.limits.max_tokens:
            raise ResourceExhausted(f"session {show(s.id)} holds {s.tokens} tokens and this turn needs up to "
                                    f"{more_tokens} more, beyond the limit of {self.limits.max_tokens} "
                                    f"(sessions.max_tokens)", FIELD)


def check_turn(s: Session, turn: int) -> None:
    if s.turns != turn:
        raise FailedPrecondition(f"session {show(s.id)} holds {s.turns} turns; turn {turn} does not follow", FIELD)


class SessionCaches(Sessions):
    """The target's sessions: each holds the KV cache of its turns so far."""

    def answer(self, model, session_id: str, turn: int, payload, question: str, max_new_tokens: int,
               on_token: Callable[[str], None] | None = None):
        """Answer `question` after `payload` as turn `turn` of the session, from and into its cache.
        Returns the generation (its `cache_tokens`: the whole session's) and the session."""
        s = self.open(session_id, turn)
        with s.lock:
            check_turn(s, turn)  # a concurrent turn of the same number got here first
            with torch.no_grad():
                embeds = model.target_inputs(payload, question)
            # the prompt, the answer and the answer's last token (its end)
            self.check_room(s, embeds.shape[1] + max_new_tokens + 1)
            if s.state is None:
                s.state = model.new_cache()
            # a compressed cache (compression/) holds the turn exact while it is read and answered,
            # and compresses it to its budget once the turn is done
            begin, end = getattr(s.state, "begin_turn", None), getattr(s.state, "end_turn", None)
            try:
                if begin is not None:
                    begin()
                gen = model.generate(embeds, max_new_tokens, on_token=on_token, cache=s.state)
                if end is not None:
                    end()
                    gen.cache_tokens = max(s.state.kv_lengths())
            except BaseException:
                self.evict(session_id, s)  # a turn cut short leaves a cache no later turn may continue
                raise
            s.turns, s.tokens, s.last_used = turn + 1, gen.cache_tokens, self.clock()
        return gen, s


@dataclass
class TurnLog:
    """The source's record of one session: each turn's relayed request (payload kind and payload,
    question, budget) and its answer, enough to rebuild the session on a target that lost it."""

    requests: list[bytes] = field(default_factory=list)  # serialized ReceiveRequests, turn by turn
    answers: list[str] = field(default_factory=list)
    lock: Any = None  # the source's asyncio.Lock: one turn of the session at a time
