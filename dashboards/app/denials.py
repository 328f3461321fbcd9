"""Permission errors from the server, matched to the page request that needed the subject.

NATS tells a client it may not publish somewhere only asynchronously (a ``-ERR Permissions
Violation for Publish to "subject"``), and a request to a subject the user may not publish on
would just time out. The bus reader hands every such error to ``Denials.on_error``; a request
run through ``Denials.guard`` ends with ``Denied`` as soon as its subject is named, so the page
can say in words that the user's role does not allow it (a viewer pressing Pause).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from runtime.errors import TrainbusError

T = TypeVar("T")


class Denied(TrainbusError):
    """The server refused this user publishing on a subject a request needed (its role)."""

    def __init__(self, user: str, subject: str, detail: str) -> None:
        super().__init__(f"the server denied {user} publishing to {subject} ({detail})")
        self.user, self.subject, self.detail = user, subject, detail


@dataclass
class Denials:
    """The subjects requests are waiting on, and what the server said about them."""

    waiting: dict[str, asyncio.Event] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)

    def on_error(self, text: str) -> None:
        """The connection's permission-error callback (runs on the reader's loop)."""
        said = text.lower()  # nats-py lowercases the server's error: "$srv.info…" for "$SRV.INFO…"
        for subject, event in self.waiting.items():
            name = subject.lower()
            if f'"{name}"' in said or f"'{name}'" in said or name in said.split():
                self.detail[subject] = text.strip().strip("'\" ")
                event.set()

    async def guard(self, work: Awaitable[T], publishes: tuple[str, ...], user: str) -> T:
        """``await work``, or raise ``Denied`` as soon as the server refuses ``user`` one of ``publishes``."""
        doing = asyncio.ensure_future(work)
        if not publishes:
            return await doing
        events = [self.waiting.setdefault(subject, asyncio.Event()) for subject in publishes]
        for event in events:
            event.clear()
        refused = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait({doing, *refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in refused:
                waiter.cancel()
        for subject, event in zip(publishes, events, strict=True):
            if event.is_set():
                doing.cancel()
                raise Denied(user, subject, self.detail.get(subject, "permissions violation"))
        return doing.result()
