"""When the sender sends: at once for what people wait on, after a short window for the rest.

Events that may wait (``MAY_WAIT``: ``train.step``, ``heartbeat``, ``eval``; not one with a
non-finite loss, see ``may_wait``) are gathered for up to
``delay`` seconds after the first of them arrives, then go as one pipelined batch: one wake-up of
the publisher process, one read of the journal, one write to the socket, one round of acks, for
all of them. The window opens only while events come faster than that: when the last batch left
longer than ``delay`` ago, waiting would gather nothing, and the event goes at once. Every other
event (run state, checkpoints, ``run.finished``, command replies, and any type added later) rings
the bell and goes at once, taking the waiting ones with it, so order is kept. ``delay`` 0 sends
every event as soon as it is seen.

The training process writes a byte on the wake pipe for an event that goes at once (``NOW``), and
for one that may wait only when the publisher process said it is idle (``idle`` in the journal's
shared state, see ``runtime.publish.journal``): while a window is open or a batch is on its way
the sender looks at the journal by itself, so a fast training loop costs it one wake-up per
window, not one per event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

MAY_WAIT = frozenset({"train.step", "heartbeat", "eval"})
"""Event types that may wait up to the window for others to go with them."""


def may_wait(event: Any) -> bool:
    """Whether ``event`` may wait for the window: a type of ``MAY_WAIT``, unless it is an alarm (a
    loss or gradient norm that is not finite, which the audit gate flags and people wait on)."""
    if event.type not in MAY_WAIT:
        return False
    values = (getattr(event, "loss", None), getattr(event, "grad_norm", None))
    return all(v is None or math.isfinite(v) for v in values)


IDLE_LOOK_S = 1.0
"""How long an idle sender sleeps without a bell before it looks at the journal by itself."""
NOW = b"!"
"""Wake byte: an event that goes at once was appended."""
SOON = b"."
"""Wake byte: an event that may wait was appended while the publisher process was idle."""


class Idle(Protocol):
    """Where the sender says it is idle, so that the next event that may wait rings (the journal's shared state)."""

    idle: bool


class _Unshared:
    idle = False


class Window:
    """The sender's bell, its coalescing window and its close deadline (one per sender, on its event loop)."""

    def __init__(self, delay: float = 0.0, shared: Idle | None = None) -> None:
        self.delay = delay
        self.shared: Idle = shared or _Unshared()
        self.closing = False
        self.deadline = float("inf")
        self.rung = False
        self.last_sent = 0.0
        """When the last batch left (``ready`` returned): a window opens only within ``delay`` of it."""
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None

    # ---- the bell (called from the event loop: a wake-pipe reader, the process's own events) -------------

    def ring(self) -> None:
        """Send now: an event that goes at once, the window's end, or closing."""
        self.rung = True
        if self._waiter is not None:
            _wake(self._waiter)

    def soon(self) -> None:
        """Events that may wait arrived: send when the window ends (it opens now unless it is open)."""
        if self.delay <= 0 or time.monotonic() - self.last_sent > self.delay:
            self.ring()
        elif self._timer is None and not self.rung:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self.ring)

    def on_bytes(self, data: bytes) -> None:
        """What came on the wake pipe: ``NOW`` and ``SOON`` bytes."""
        if NOW in data:
            self.ring()
        else:
            self.soon()

    def close(self, timeout: float) -> None:
        """Send what is left for up to ``timeout`` s, then stop (the first call sets the deadline)."""
        if not self.closing:
            self.deadline = time.monotonic() + timeout
            self.closing = True
        self.ring()

    # ---- the sender's side ---------------------------------------------------------------------

    async def ready(self, has_new: Callable[[], bool]) -> None:
        """Return when it is time to send what ``has_new`` sees (or to stop, when closing)."""
        while not (self.rung or self.closing):
            if has_new():  # appended while a batch was on its way: no byte came for it
                self.soon()
            else:
                self.shared.idle = True
                if has_new():  # appended between the look and the flag: its writer saw no flag
                    self.shared.idle = False
                    self.soon()
            if not self.rung:
                # a look once a second: the flag's store may become visible to the training process
                # only after its append was missed by ``has_new`` (no fence between the two processes)
                await self.doze(IDLE_LOOK_S)
        self.rung = False
        self.shared.idle = False
        self.last_sent = time.monotonic()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def pause(self, seconds: float, *, until_close: bool = False) -> None:
        """Sleep ``seconds`` (a backoff), no longer than the close deadline; ``until_close``: not past close()."""
        until = min(time.monotonic() + seconds, self.deadline)
        while (left := until - time.monotonic()) > 0 and not (until_close and self.closing):
            await self.doze(left)

    async def doze(self, timeout: float | None) -> None:
        """Sleep until ``ring`` or ``timeout`` (None: no timeout); a bare future and timer."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
