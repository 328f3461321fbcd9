"""The queue between the training thread and the publisher's sender, and the sender's wake-up.

The training thread only ever calls ``put`` (one queue put, and a wake-up when the sender
sleeps); the sender takes events with ``queue.get_nowait`` and reports how many are settled
(acked, spilled to the outbox or set aside), which is what ``NatsPublisher.flush`` waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading

from schemas import Event


class Handoff:
    """Events from the training thread to the sender, and how many of them are settled."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self.enqueued = 0
        self.settled = 0
        self.settled_cv = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sleeping = False
        self.closing = False
        self.deadline = float("inf")
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event | None) -> None:
        """(caller side) Queue ``event`` (None: close) and wake the sender if it sleeps."""
        if event is not None:
            self.enqueued += 1
        self.queue.put(event)
        if self.sleeping or event is None:
            self.nudge()

    def nudge(self) -> None:
        """(caller side) Wake the sender's loop now."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to wake
                self.loop.call_soon_threadsafe(self.wake_up)

    def settle(self, n: int) -> None:
        with self.settled_cv:
            self.settled += n
            self.settled_cv.notify_all()

    def wake_up(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def doze(self, timeout: float) -> None:
        """Sleep until ``wake_up`` or ``timeout``; a bare future and timer, as this runs once per event."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self.wake_up)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
