"""Dynamic batching: concurrent requests for one model are grouped up to a size and a wait budget.

Each request carries a key (task and its parameters, e.g. ``("caption", 20, 1)``) and a list of
items. The batcher waits at most ``max_wait_s`` after the oldest pending request for more items of
the same key, up to ``max_batch`` items, then runs them as one batch on a single worker thread (one
model, one thread: the model's intra-op threads do the parallel work) and hands every request its
own results. Requests whose caller gave up (timeout, disconnect) are dropped before they run.
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


@dataclass
class _Pending:
    key: Hashable
    items: Sequence[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


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

    async def submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        """Queue ``items`` under ``key``; returns their results once their batch has run."""
        if not self.running:
            raise RuntimeError("batcher is not running")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are waiting (max_queue {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(key, list(items), fut))
        self._wake.set()
        return await fut

    def _ready_items(self, key: Hashable) -> int:
        return sum(len(p.items) for p in self._pending if p.key == key and not p.future.done())

    def _take(self, key: Hashable) -> list[_Pending]:
        group: list[_Pending] = []
        size = 0
        keep: collections.deque[_Pending] = collections.deque()
        while self._pending:
            p = self._pending.popleft()
            if p.future.done():  # the caller gave up
                continue
            if p.key == key and (not group or size + len(p.items) <= self.max_batch):
                group.append(p)
                size += len(p.items)
            else:
                keep.append(p)
        self._pending = keep
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not any(not p.future.done() for p in self._pending):
                self._pending.clear()
                self._wake.clear()
                await self._wake.wait()
            first = next(p for p in self._pending if not p.future.done())
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
            if not group:
                continue
            items = [it for p in group for it in p.items]
            if self.on_batch is not None:
                self.on_batch(first.key, len(items))
            try:
                results = await loop.run_in_executor(self._executor, self.run, first.key, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # every request of the batch gets the error
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches_run += 1
            start = 0
            for p in group:
                n = len(p.items)
                if not p.future.done():
                    p.future.set_result(list(results[start:start + n]))
                start += n
