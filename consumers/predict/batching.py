"""Micro-batching: concurrent requests joined into one model call, with a bounded wait and size.

Jobs are submitted from the event loop; one worker thread runs the model on a batch at a time,
so the loop keeps receiving while the model works. A batch closes when it holds ``max_batch``
items, or when the queue is empty and either it is as large as the previous batch or
``max_wait`` has passed since its first job. A lone client therefore never waits (its previous
batch was 1), while a burst of clients is collected for at most ``max_wait``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class BatchStats:
    """What the batcher did (reported in the service's ``$SRV.STATS``)."""

    batches: int = 0
    jobs: int = 0
    items: int = 0
    largest: int = 0
    failed_batches: int = 0


class MicroBatcher(Generic[J, R]):
    """Runs ``run(jobs) -> results`` (one result per job, in order) on batches of submitted jobs."""

    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        *,
        max_batch: int,
        max_wait: float,
        size: Callable[[J], int] = lambda job: 1,
    ) -> None:
        self.run, self.max_batch, self.max_wait, self.size = run, max_batch, max_wait, size
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[J, asyncio.Future[R]] | None] = asyncio.Queue()
        self._held: tuple[J, asyncio.Future[R]] | None = None
        self._expect = 1
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainbus-model")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> MicroBatcher[J, R]:
        """Start collecting; call from the event loop that will submit."""
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def submit(self, job: J) -> R:
        """The result of ``job``, once the batch it joined has run; the batch's error if it failed."""
        if self._closing:
            raise RuntimeError("the predictor is shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        return await future

    async def close(self) -> None:
        """Run every job submitted so far, then stop the worker."""
        self._closing = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    async def _next(self, timeout: float | None) -> tuple[J, asyncio.Future[R]] | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self, first: tuple[J, asyncio.Future[R]]) -> tuple[list[tuple[J, asyncio.Future[R]]], bool]:
        """The batch that starts with ``first``; True when the stop marker was reached."""
        loop = asyncio.get_running_loop()
        batch, total = [first], self.size(first[0])
        deadline = loop.time() + self.max_wait
        while total < self.max_batch:
            enough = total >= min(self._expect, self.max_batch)
            try:
                item = await self._next(0 if enough else deadline - loop.time())
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if item is None:
                return batch, True
            if total + self.size(item[0]) > self.max_batch:
                self._held = item  # starts the next batch
                break
            batch.append(item)
            total += self.size(item[0])
        self._expect = total
        return batch, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is None:
                break
            batch, stopping = await self._collect(first)
            jobs = [job for job, _ in batch]
            self.stats.batches += 1
            self.stats.jobs += len(jobs)
            items = sum(self.size(job) for job in jobs)
            self.stats.items += items
            self.stats.largest = max(self.stats.largest, items)
            try:
                results = await loop.run_in_executor(self._worker, self.run, jobs)
            except Exception as exc:  # the batch's requests get the error; the service goes on
                self.stats.failed_batches += 1
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
