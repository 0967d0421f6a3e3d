"""services.batching.Batcher: batches are cut when the model is free, from all that queued."""

import asyncio
import threading
import time

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


def test_a_poisoned_job_fails_alone_and_its_batch_mates_get_their_results():
    """A batch whose forward fails runs again job by job: only the job that fails alone gets an error."""
    calls = []

    def fn(jobs):
        calls.append(list(jobs))
        if "bad" in jobs:
            raise ValueError("bad job")
        return [j.upper() for j in jobs]

    async def main():
        b = Batcher(fn, wait_s=0.05)
        first = await asyncio.gather(b.submit("a"), b.submit("bad"), b.submit("b"), return_exceptions=True)
        after = await asyncio.gather(b.submit("c"), b.submit("d"))
        return first, after

    (a, bad, b_), after = asyncio.run(main())
    assert a == ("A", 1) and b_ == ("B", 1)  # answered alone, and reported so
    assert isinstance(bad, ValueError) and str(bad) == "bad job"
    assert calls[:4] == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]
    assert after == [("C", 2), ("D", 2)] and calls[4:] == [["c", "d"]]  # batching resumes


def test_an_error_of_a_lone_job_is_not_retried():
    calls = []

    def fn(jobs):
        calls.append(list(jobs))
        raise ValueError("always")

    async def main():
        b = Batcher(fn)
        return await asyncio.gather(b.submit(1), return_exceptions=True)

    (err,) = asyncio.run(main())
    assert isinstance(err, ValueError) and calls == [[1]]


def test_a_job_whose_caller_gave_up_during_the_retries_is_not_run_again():
    calls, gone = [], {}

    def fn(jobs):
        calls.append(list(jobs))
        if "bad" in jobs:
            raise ValueError("bad job")
        if jobs == ["a"]:  # while the first job runs alone, the last caller leaves
            gone["loop"].call_soon_threadsafe(gone["task"].cancel)
            time.sleep(0.05)
        return jobs

    async def main():
        b = Batcher(fn, wait_s=0.05)
        gone["loop"] = asyncio.get_running_loop()
        tasks = [asyncio.create_task(b.submit(j)) for j in ("a", "bad", "c")]
        gone["task"] = tasks[2]
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert a == ("a", 1) and isinstance(bad, ValueError) and isinstance(c, asyncio.CancelledError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"]]


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
        b = Batcher(lambda jobs: [], wait_s=0.05)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    out = asyncio.run(main())
    # the batch of 2 lost its results; each job alone lost its one result too
    assert all(isinstance(e, RuntimeError) and "0 results for 1 jobs" in str(e) for e in out)


@pytest.mark.parametrize("size,wait", [(0, 0.0), (4, -1.0)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError):
        Batcher(lambda jobs: jobs, size, wait)
