"""Run a token-streaming generation in a worker thread and hand its pieces to an async generator.

`async for item in run(fn)` calls `fn(on_token)` off the event loop (`asyncio.to_thread`): each
piece of text the generation passes to `on_token` is yielded as it comes (a `str`), then `fn`'s
result (anything else). The thread hands pieces over with `loop.call_soon_threadsafe`, so the event
loop never blocks on the thread and keeps serving other requests meanwhile.

When the consumer goes away (the client cancelled or disconnected: Serve cancels the replica's task,
which raises `CancelledError` in the generator or closes it), the generation is stopped, not left to
run to `max_new_tokens` on a core nobody reads: a `threading.Event` is set, and the thread's next
`on_token` raises `Cancelled`, which unwinds the decode loop (`latentwire.engine.Engine.generate`
calls `on_token` once per decoded piece of text).

A consumer can also go away without closing the generator: when Serve's cancellation lands while its
replica loop awaits its own work rather than this generator, the generator is left suspended at a
`yield` until it is collected, which may be much later. So the thread also stops when pieces have
waited `STALL_S` seconds with none taken: a live consumer takes each piece as soon as the event loop
runs, so a backlog that old means no one is reading.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from latentwire.errors import LatentWireError

_END = object()
STALL_S = 3.0  # seconds pieces may wait untaken before the generation counts its reader as gone


class Cancelled(LatentWireError):
    """Raised inside a generating thread whose consumer went away: it aborts the decode loop. A reader
    that was only slow (its pieces stale for STALL_S) gets UNAVAILABLE, which clients retry."""

    code = "UNAVAILABLE"


class Stats:
    """Counts of this process's streamed generations, for operators and tests: `started`, `finished`
    (ran to their end), `cancelled` (stopped by `Cancelled`), `failed` (raised anything else),
    `running` (now) and `pieces` (pieces of text handed over)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict(started=0, finished=0, cancelled=0, failed=0, running=0, pieces=0)

    def add(self, **delta: int) -> None:
        with self._lock:
            for key, n in delta.items():
                self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


STATS = Stats()


class _Reader:
    """Whether a stream's consumer still reads: pieces handed over (by the producer), taken (by the
    consumer), and since when the backlog has waited (it started, or a piece was taken). Each count
    is written by one side only, so no lock is needed."""

    def __init__(self):
        self.handed = self.taken = 0
        self.since = time.monotonic()

    def gone(self) -> bool:
        """Called by the producer before handing a piece over: has the backlog waited STALL_S?"""
        now = time.monotonic()
        if self.handed == self.taken:
            self.since = now
            return False
        return now - self.since > STALL_S

    def took(self) -> None:
        self.taken += 1
        self.since = time.monotonic()


async def run(fn: Callable[[Callable[[str], None]], Any]) -> AsyncIterator[Any]:
    """Yield the text pieces `fn(on_token)` emits from its worker thread, then its result; an
    exception `fn` raises is raised here after the pieces before it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    reader = _Reader()

    def on_token(text: str) -> None:
        if stop.is_set() or reader.gone():
            stop.set()
            raise Cancelled("the stream's reader went away (or took nothing for STALL_S seconds)")
        STATS.add(pieces=1)
        reader.handed += 1
        loop.call_soon_threadsafe(queue.put_nowait, text)

    def work():
        STATS.add(started=1, running=1)
        try:
            out = fn(on_token)
        except Cancelled:
            STATS.add(cancelled=1, running=-1)
            raise
        except BaseException:
            STATS.add(failed=1, running=-1)
            raise
        STATS.add(finished=1, running=-1)
        return out

    # the thread's pieces were queued with call_soon_threadsafe before it returned, so the end
    # marker (queued when the task completes, after them) comes last
    task = asyncio.ensure_future(asyncio.to_thread(work))
    task.add_done_callback(lambda _: queue.put_nowait(_END))
    try:
        while (item := await queue.get()) is not _END:
            yield item
            reader.took()  # the consumer came back for more
        yield task.result()  # the result, or the exception the generation raised
    finally:
        if not task.done():  # the consumer left early: stop the thread at its next token
            stop.set()
            task.cancel()


async def relay(fn: Callable[[Callable[[str], None]], Any]) -> AsyncIterator[Any]:
    """`run` for a coroutine on this event loop: yield the pieces `await fn(emit)` emits, then its
    result. The request task is cancelled when the consumer leaves, and, as in `run`, `emit` raises
    `Cancelled` once pieces have waited STALL_S with none taken (a consumer that left without closing
    this generator), which ends `fn`'s work, its calls to other services included."""
    queue: asyncio.Queue = asyncio.Queue()
    reader = _Reader()

    def emit(text: str) -> None:
        if reader.gone():
            raise Cancelled("the stream's reader took nothing for STALL_S seconds")
        reader.handed += 1
        queue.put_nowait(text)

    task = asyncio.ensure_future(fn(emit))
    task.add_done_callback(lambda _: queue.put_nowait(_END))
    try:
        while (item := await queue.get()) is not _END:
            yield item
            reader.took()
        yield task.result()  # the result, or the exception the request raised
    finally:  # the consumer left (CancelledError, GeneratorExit): stop the request's work
        if not task.done():
            task.cancel()
