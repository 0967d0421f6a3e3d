"""Request batching for a replica: a batch is cut when the model is free, from all that queued.

`@serve.batch` closes a batch `batch_wait_timeout_s` after its first arrival even while the
previous batch still runs, and the closed batches then wait their turn. Under load the queue is
cut into many small batches: with 16 requests in flight on the embedded pair, the target answered
batches of 2-5 while 8-10 requests waited. Here the worker takes everything that queued while the
model was busy (up to `max_batch_size`) in one batch, and waits `wait_s` for company only when it
finds the model idle.

A batch whose call fails is run again job by job, so that the error reaches only the callers whose
own job fails; the others get their results (reported as batches of 1).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class Batcher:
    """`result, batch_size = await batcher.submit(job)` runs `fn(jobs) -> results` (same order) off
    the event loop; `batch_size` is how many jobs shared that call."""

    def __init__(self, fn: Callable[[list], list], max_batch_size: int = 16, wait_s: float = 0.0):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1 and wait_s >= 0, got {max_batch_size}, {wait_s}")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, job: Any) -> tuple[Any, int]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await fut

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        live = [(j, f) for j, f in self._pending if not f.done()]  # callers gone (deadline): skip
        batch, self._pending = live[:self.max_batch_size], live[self.max_batch_size:]
        return batch

    async def _work(self) -> None:
        if self.wait_s and len(self._pending) < self.max_batch_size:
            await asyncio.sleep(self.wait_s)  # model idle: let a burst of arrivals join
        while batch := self._take():
            try:
                results = await self._call(batch)
            except Exception as err:  # noqa: BLE001 - retried below, or reaches its one caller
                if len(batch) == 1:
                    _settle(batch[0][1], error=err)
                    continue
                # One bad job (a prompt the model cannot take, a packet that breaks the forward)
                # must not fail the requests that happened to share its batch: each job runs
                # again alone, and only the ones that fail alone get an error.
                for job, fut in batch:
                    if fut.done():  # its caller gave up meanwhile
                        continue
                    try:
                        result = (await self._call([(job, fut)]))[0]
                    except Exception as one:  # noqa: BLE001
                        _settle(fut, error=one)
                    else:
                        _settle(fut, (result, 1))
            else:
                for (_, fut), result in zip(batch, results):
                    _settle(fut, (result, len(batch)))

    async def _call(self, batch: list[tuple[Any, asyncio.Future]]) -> list:
        results = await asyncio.to_thread(self.fn, [job for job, _ in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"batched function returned {len(results)} results for {len(batch)} jobs")
        return results


def _settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give a caller its result or error, unless it gave up already (a cancelled future)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
