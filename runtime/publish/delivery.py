"""Pipelined JetStream publishing: the acks of one batch, what each refusal means, and the backoff.

The publisher sends a batch without waiting message by message; acks come back on one wildcard
inbox and ``Acks`` routes them to the current batch. Each message of a batch ends in one of three
states:

- stored: acked (or a duplicate JetStream dropped);
- refused for good ("poison"): retrying cannot help — bigger than the stream allows, a subject
  this user may not publish to, no stream and not allowed to create one. The publisher sets it
  aside in the dead-letter file so that the events after it flow;
- not yet: no ack in time, or a refusal that may pass (the stream is missing or full, JetStream
  is busy). The publisher retries these with ``Backoff``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

# JetStream error codes that mean "this message can never be stored here" (nats-server's errors.json)
PERMANENT = {10054: "the message is bigger than the stream's max_msg_size"}
_DENIED = re.compile(r"publish to \"?([^\"'\s]+)", re.IGNORECASE)


def denied_subject(text: str) -> str | None:
    """The subject of a server's ``Permissions Violation for Publish to "…"`` error, if it is one."""
    found = _DENIED.search(text)
    return found.group(1) if found else None


def _error(data: bytes) -> tuple[int, str]:
    try:
        err = json.loads(data).get("error") or {}
    except (ValueError, AttributeError):
        return 0, data.decode(errors="replace")
    return int(err.get("err_code") or 0), str(err.get("description") or err)


class BatchAcks:
    """Acks of one pipelined batch, counted as they arrive (no future per message)."""

    def __init__(self, number: int, subjects: list[str]) -> None:
        self.number = number
        self.subjects = subjects
        self.ok = bytearray(len(subjects))
        self.poison: dict[int, str] = {}
        self.no_stream: set[int] = set()
        self.published = 0
        self.received = 0
        self.expected = len(subjects)
        self.duplicates = 0
        self.error: str | None = None  # the first refusal that may pass
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expect(self, n: int) -> None:
        self.expected = n
        self._check()

    def give_up(self) -> None:
        """The ack timeout: stop waiting; whatever is unacked gets re-sent."""
        if not self.done.done():
            self.done.set_result(None)

    def _check(self) -> None:
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def settled_prefix(self) -> int:
        """How many messages from the start are stored or refused for good."""
        i = 0
        while i < len(self.ok) and (self.ok[i] or i in self.poison):
            i += 1
        return i

    def on_ack(self, i: int, data: bytes, status: str | None) -> None:
        self.received += 1
        if status == "503" or (status and not data):
            self.no_stream.add(i)  # no stream listens on the subject (or JetStream is away)
            self.error = self.error or f"no stream stored the event (status {status})"
        elif not data or b'"error"' in data:
            code, text = _error(data)
            if code in PERMANENT:
                self.poison[i] = f"refused by JetStream: {text} (err_code {code}): {PERMANENT[code]}"
            else:
                self.error = self.error or f"refused by JetStream: {text} (err_code {code})"
        elif not self.ok[i]:
            self.ok[i] = 1
            if b'"duplicate"' in data:  # the server writes `"duplicate": true`, only when true
                self.duplicates += 1
        self._check()

    def deny(self, subject: str, reason: str) -> None:
        """The server refused this user publishing on ``subject``: the first such unanswered message is poison.

        A refused publish gets no ack, only this error, one per message and in order.
        """
        for i in range(len(self.subjects)):
            if self.subjects[i] == subject and not self.ok[i] and i not in self.poison:
                self.poison[i] = reason
                self.received += 1
                self._check()
                return


class Acks:
    """One wildcard inbox subscription that routes JetStream acks to the current batch."""

    def __init__(self, inbox: str) -> None:
        self.inbox = inbox
        self.number = 0
        self.current: BatchAcks | None = None

    def begin(self, subjects: list[str]) -> BatchAcks:
        self.number += 1
        self.current = BatchAcks(self.number, subjects)
        return self.current

    async def on_ack(self, msg: Any) -> None:
        state = self.current
        number, _, index = msg.subject.rpartition(".")
        if state is None or not number.endswith(f".{state.number}"):
            return  # a late ack of an earlier batch: that batch was already re-sent
        status = msg.headers.get("Status") if msg.headers else None
        state.on_ack(int(index), msg.data or b"", status)


class Backoff:
    """Bounded exponential delays with jitter: ``first``, twice that, … up to ``cap``, each times 0.5–1."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempts = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return delay * random.uniform(0.5, 1.0)  # jitter: many publishers do not retry in step

    def reset(self) -> None:
        self.attempts = 0
