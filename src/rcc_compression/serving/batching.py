"""Dynamic batching: concurrent requests for one model are grouped up to a size and a wait budget.

Each request carries a key (task and its parameters, e.g. ``("caption", 20, 1)``) and a list of
items. The batcher waits at most ``max_wait_s`` after the oldest pending request for more items of
the same key, up to ``max_batch`` items, then runs them as one batch on a single worker thread (one
model, one thread: the model's intra-op threads do the parallel work) and hands every request its
own results.

What one request can do to the others is bounded three ways:

- *Chunks, round robin*: a request with more than ``max_batch`` items is run a batch at a time and
  goes to the back of the queue between batches, so a large request delays a small one by one
  batch, not by all its work; a request whose caller gave up (timeout, disconnect) is dropped at
  the next batch boundary, so an abandoned request stops taking the worker's time.
- *A cost estimate*: the batcher keeps the measured seconds per item of every key; a request whose
  own estimated time exceeds what its deadline leaves is refused before it runs
  (:class:`WouldTimeOut`).
- *Isolation*: when a batch of several requests fails, each request is run again alone; one that
  fails alone gets :class:`ItemFailed` (its own input is at fault) and the others their results.
  When every one fails alone the error is the model's and reaches them all as raised.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More requests wait than the batcher accepts; the server answers 503."""


class WouldTimeOut(Exception):
    """The request's estimated model time exceeds the time its deadline leaves; it was not started."""

    def __init__(self, estimate_s: float, left_s: float, items: int) -> None:
        super().__init__(f"{items} item(s) need about {estimate_s:.2f} s of model time at the measured rate; "
                         f"{max(left_s, 0):.2f} s of the request's time are left")
        self.estimate_s, self.left_s, self.items = estimate_s, left_s, items


class ItemFailed(Exception):
    """The model failed on this request's own items (run alone, apart from the batch it came in)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}")
        self.cause = cause


@dataclass
class _Pending:
    key: Hashable
    items: Sequence[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0  # items handed to batches so far (a request can span several batches)
    turns: int = 0  # batches it had items in: fewer turns go first (round robin)
    results: list[Any] = field(default_factory=list)

    @property
    def left(self) -> int:
        return len(self.items) - self.taken


class DynamicBatcher:
    """Groups requests of one model into batches and runs ``run(key, items) -> results`` on them.

    ``run`` returns one result per item, in order. ``on_batch(key, size)`` is called for every batch
    (metrics). Start with :meth:`start` inside the serving event loop; :meth:`close` stops it.
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait_s: float = 0.005, max_queue: int = 256,
                 on_batch: Callable[[Hashable, int], None] | None = None, name: str = "model") -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rcc-{name}")
        self.batches_run = 0
        #: measured seconds per item of each key (exponential moving average over its batches)
        self.seconds_per_item: dict[Hashable, float] = {}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self._pending:
            if not p.future.done():
                p.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def estimate(self, key: Hashable, n_items: int) -> float | None:
        """Estimated seconds of model time for ``n_items`` items under ``key`` (``None``: never measured)."""
        rate = self.seconds_per_item.get(key)
        return None if rate is None else rate * n_items

    async def submit(self, key: Hashable, items: Sequence[Any], deadline: float | None = None) -> list[Any]:
        """Queue ``items`` under ``key``; returns their results once their batches have run.

        With ``deadline`` (a ``time.monotonic()`` value) a request whose estimated model time
        exceeds what is left is refused at once with :class:`WouldTimeOut`.
        """
        if not self.running:
            raise RuntimeError("batcher is not running")
        if deadline is not None:
            est = self.estimate(key, len(items))
            left = deadline - time.monotonic()
            if est is not None and est > left:
                raise WouldTimeOut(est, left, len(items))
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are waiting (max_queue {self.max_queue})")
        if not items:
            return []
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(key, list(items), fut))
        self._wake.set()
        return await fut

    def _ready_items(self, key: Hashable) -> int:
        return sum(p.left for p in self._pending if p.key == key and not p.future.done())

    def _next(self) -> _Pending:
        """The request to serve next: fewest batches so far, then oldest (round robin over large requests)."""
        return min((p for p in self._pending if not p.future.done()), key=lambda p: (p.turns, p.arrived))

    def _take(self, key: Hashable) -> list[tuple[_Pending, int, int]]:
        """Slices ``(request, start, end)`` of up to ``max_batch`` items of ``key``: requests with fewer
        batches so far first, then the oldest; a request not taken whole stays queued for its next turn."""
        live = [p for p in self._pending if not p.future.done()]  # a caller that gave up: nothing more runs
        group: list[tuple[_Pending, int, int]] = []
        size = 0
        for p in sorted((p for p in live if p.key == key), key=lambda p: (p.turns, p.arrived)):
            if size >= self.max_batch:
                break
            n = min(p.left, self.max_batch - size)
            group.append((p, p.taken, p.taken + n))
            p.taken += n
            p.turns += 1
            size += n
        self._pending = collections.deque(p for p in live if p.left)
        return group

    async def _loop(self) -> None:
        while True:
            while not any(not p.future.done() for p in self._pending):
                self._pending.clear()
                self._wake.clear()
                await self._wake.wait()
            first = self._next()
            while self._ready_items(first.key) < self.max_batch and not first.future.done():
                remaining = first.arrived + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            group = self._take(first.key)
            if group:
                await self._run_group(first.key, group)

    async def _call(self, key: Hashable, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        results = await loop.run_in_executor(self._executor, self.run, key, items)
        if len(results) != len(items):
            raise RuntimeError(f"batch returned {len(results)} results for {len(items)} items")
        rate = (time.perf_counter() - t0) / len(items)
        old = self.seconds_per_item.get(key)
        self.seconds_per_item[key] = rate if old is None else 0.7 * old + 0.3 * rate
        return list(results)

    async def _run_group(self, key: Hashable, group: list[tuple[_Pending, int, int]]) -> None:
        items = [it for p, a, b in group for it in p.items[a:b]]
        if self.on_batch is not None:
            self.on_batch(key, len(items))
        try:
            results = await self._call(key, items)
        except Exception as exc:  # noqa: BLE001 - every failure is handed to the requests it concerns
            await self._isolate(key, group, exc)
            return
        self.batches_run += 1
        start = 0
        for p, a, b in group:
            self._deliver(p, results[start:start + (b - a)])
            start += b - a

    async def _isolate(self, key: Hashable, group: list[tuple[_Pending, int, int]], exc: Exception) -> None:
        """After a failed batch of several requests, run each alone: only the requests that fail alone fail."""
        live = [(p, a, b) for p, a, b in group if not p.future.done()]
        if len(live) <= 1:
            for p, _, _ in live:
                p.future.set_exception(exc)
            return
        failures: list[tuple[_Pending, Exception]] = []
        for p, a, b in live:
            if p.future.done():
                continue
            try:
                self._deliver(p, await self._call(key, list(p.items[a:b])))
            except Exception as own:  # noqa: BLE001
                failures.append((p, own))
        every_one = len(failures) == len(live)
        for p, own in failures:
            if not p.future.done():
                p.future.set_exception(own if every_one else ItemFailed(own))

    @staticmethod
    def _deliver(p: _Pending, results: list[Any]) -> None:
        if p.future.done():
            return
        p.results.extend(results)
        if len(p.results) == len(p.items):
            p.future.set_result(p.results)
