"""The dynamic batcher: grouping by key up to a size and a wait budget, results in order, errors, queue bound."""

from __future__ import annotations

import asyncio
import time

import pytest

from rcc_compression.serving.batching import DynamicBatcher, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_groups_same_key_up_to_max_batch_and_returns_each_its_results():
    calls = []

    def work(key, items):
        calls.append((key, list(items)))
        return [(key, x * 10) for x in items]

    async def main():
        b = DynamicBatcher(work, max_batch=4, max_wait_s=0.05)
        b.start()
        reqs = [b.submit("a", [i]) for i in range(6)] + [b.submit("b", [100, 101])]
        out = await asyncio.gather(*reqs)
        await b.close()
        return out

    out = run(main())
    assert out == [[("a", i * 10)] for i in range(6)] + [[("b", 1000), ("b", 1010)]]
    sizes = {k: [len(i) for kk, i in calls if kk == k] for k in ("a", "b")}
    assert sizes == {"a": [4, 2], "b": [2]}


def test_wait_budget_bounds_the_delay_of_a_lone_request():
    async def main():
        b = DynamicBatcher(lambda k, items: items, max_batch=64, max_wait_s=0.03)
        b.start()
        t = time.monotonic()
        out = await b.submit("k", [1])
        dt = time.monotonic() - t
        await b.close()
        return out, dt

    out, dt = run(main())
    assert out == [1] and 0.02 <= dt < 1.0


def test_an_error_reaches_every_request_of_the_batch_and_the_batcher_goes_on():
    def work(key, items):
        if key == "bad":
            raise ValueError("boom")
        return items

    async def main():
        b = DynamicBatcher(work, max_batch=8, max_wait_s=0.01)
        b.start()
        res = await asyncio.gather(b.submit("bad", [1]), b.submit("bad", [2]), return_exceptions=True)
        ok = await b.submit("good", [3])
        await b.close()
        return res, ok

    res, ok = run(main())
    assert all(isinstance(r, ValueError) for r in res) and ok == [3]


def test_queue_is_bounded_and_cancelled_requests_are_dropped():
    ran = []

    def work(key, items):
        time.sleep(0.05)
        ran.extend(items)
        return items

    async def main():
        b = DynamicBatcher(work, max_batch=1, max_wait_s=0.0, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit("k", [0]))
        await asyncio.sleep(0.01)  # 0 is running
        second = asyncio.ensure_future(b.submit("k", [1]))
        third = asyncio.ensure_future(b.submit("k", [2]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit("k", [3])
        second.cancel()
        assert await first == [0] and await third == [2]
        await b.close()

    run(main())
    assert ran == [0, 2]


def test_a_bad_item_fails_only_its_own_request():
    """A batch that fails is run again request by request: only the request whose own items fail gets the error."""
    from rcc_compression.serving.batching import ItemFailed

    def work(key, items):
        if "bad" in items:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return [x.upper() for x in items]

    async def main():
        b = DynamicBatcher(work, max_batch=16, max_wait_s=0.05)
        b.start()
        reqs = [b.submit("k", [f"t{i}"]) for i in range(8)] + [b.submit("k", ["bad"])]
        out = await asyncio.gather(*reqs, return_exceptions=True)
        await b.close()
        return out

    for _ in range(3):
        out = run(main())
        assert out[:8] == [[f"T{i}"] for i in range(8)]
        assert isinstance(out[8], ItemFailed) and "UnicodeEncodeError" in str(out[8])


def test_large_requests_take_turns_and_abandoned_ones_stop():
    """A request over max_batch runs a batch per turn; a small one arriving meanwhile goes next; a cancelled
    one runs no further batch."""
    calls = []

    def work(key, items):
        calls.append(list(items))
        time.sleep(0.02)
        return items

    async def main():
        b = DynamicBatcher(work, max_batch=4, max_wait_s=0.0)
        b.start()
        big = asyncio.ensure_future(b.submit("k", list(range(100, 116))))
        await asyncio.sleep(0.005)
        small = await b.submit("k", ["s"])
        big.cancel()
        await asyncio.sleep(0.1)
        await b.close()
        return small

    assert run(main()) == ["s"]
    assert calls[0] == [100, 101, 102, 103] and "s" in calls[1], calls
    assert sum(len(c) for c in calls) < 16, "the cancelled request kept running"


def test_a_request_that_cannot_finish_in_time_is_refused_before_it_runs():
    from rcc_compression.serving.batching import WouldTimeOut

    def work(key, items):
        time.sleep(0.01 * len(items))
        return items

    async def main():
        b = DynamicBatcher(work, max_batch=8, max_wait_s=0.0)
        b.start()
        await b.submit("k", list(range(8)))  # measures about 0.01 s per item
        with pytest.raises(WouldTimeOut, match="need about"):
            await b.submit("k", list(range(64)), deadline=time.monotonic() + 0.2)
        ok = await b.submit("k", [1, 2], deadline=time.monotonic() + 0.2)
        await b.close()
        return ok

    assert run(main()) == [1, 2]
