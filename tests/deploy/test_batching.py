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
