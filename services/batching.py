"""Request batching for a replica: a batch is cut when the model is free, from all that queued.

`@serve.batch` closes a batch `batch_wait_timeout_s` after its first arrival even while the
previous batch still runs, and the closed batches then wait their turn. Under load the queue is
cut into many small batches: with 16 requests in flight on the embedded pair, the target answered
batches of 2-5 while 8-10 requests waited. Here the worker takes everything that queued while the
model was busy (up to `max_batch_size`) in one batch, and waits `wait_s` for company only when it
finds the model idle.
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
                results = await asyncio.to_thread(self.fn, [job for job, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batched function returned {len(results)} results for {len(batch)} jobs")
            except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            else:
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result((result, len(batch)))
