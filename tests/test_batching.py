"""services.batching.Batcher: batches are cut when the model is free, from all that queued."""

import asyncio
import threading

import pytest

from services.batching import Batcher


class SlowModel:
    """A batched function that blocks until released, and records the batches it ran."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()

    def __call__(self, jobs):
        self.batches.append(list(jobs))
        assert self.release.wait(10)
        return [j * 10 for j in jobs]


async def _until(cond, timeout=5.0):
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_requests_queued_during_a_batch_form_the_next_batch_whole():
    async def main():
        model = SlowModel()
        b = Batcher(model, max_batch_size=16, wait_s=0.0)
        first = asyncio.create_task(b.submit(0))
        await _until(lambda: len(model.batches) == 1)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)  # a timer-cut batcher would have closed small batches by now
        model.release.set()
        return (await first)[0], [r for r, _ in await asyncio.gather(*rest)], model.batches

    first, rest, batches = asyncio.run(main())
    assert first == 0 and rest == [i * 10 for i in range(1, 11)]
    assert [len(x) for x in batches] == [1, 10]
    assert batches[1] == list(range(1, 11))  # arrival order kept


def test_max_batch_size_caps_each_batch():
    async def main():
        model = SlowModel()
        b = Batcher(model, max_batch_size=4)
        first = asyncio.create_task(b.submit(0))
        await _until(lambda: len(model.batches) == 1)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        model.release.set()
        await asyncio.gather(first, *rest)
        return model.batches

    assert [len(x) for x in asyncio.run(main())] == [1, 4, 4, 2]


def test_an_idle_model_waits_for_a_burst():
    async def main():
        model = SlowModel()
        model.release.set()
        b = Batcher(model, max_batch_size=16, wait_s=0.1)
        tasks = [asyncio.create_task(b.submit(0))]
        await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await asyncio.gather(*tasks)
        return model.batches

    assert asyncio.run(main()) == [[0, 1, 2]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    calls = []

    def fn(jobs):
        calls.append(list(jobs))
        if "bad" in jobs:
            raise ValueError("bad job")
        return [j.upper() for j in jobs]

    async def main():
        b = Batcher(fn, wait_s=0.05)
        failed = await asyncio.gather(b.submit("a"), b.submit("bad"), return_exceptions=True)
        ok, _ = await b.submit("c")
        return failed, ok

    failed, ok = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in failed)
    assert ok == "C" and calls == [["a", "bad"], ["c"]]


def test_a_caller_that_gave_up_is_not_computed():
    async def main():
        model = SlowModel()
        b = Batcher(model)
        first = asyncio.create_task(b.submit(0))
        await _until(lambda: len(model.batches) == 1)
        gone = asyncio.create_task(b.submit(1))
        kept = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # e.g. the client's deadline passed while it queued
        model.release.set()
        await first
        return (await kept)[0], model.batches

    kept, batches = asyncio.run(main())
    assert kept == 20 and batches == [[0], [2]]


def test_a_function_that_loses_results_is_an_error_not_a_hang():
    async def main():
        b = Batcher(lambda jobs: jobs[:1], wait_s=0.05)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "1 results for 2 jobs" in str(e) for e in out)


@pytest.mark.parametrize("size,wait", [(0, 0.0), (4, -1.0)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError):
        Batcher(lambda jobs: jobs, size, wait)
