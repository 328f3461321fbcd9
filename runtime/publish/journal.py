"""The hand-off file between a training process and its publisher process, and what they share.

The training process appends each event to the journal, which is the run's outbox file
(``outbox.jsonl``, one ``subject<TAB>msg_id<TAB>json`` line per event), with one unbuffered
``write``: an event handed over is in the page cache and survives a kill of either process. The
publisher process (``runtime.publish.process``) reads the file through ``JournalOutbox``, publishes in
order and commits how far JetStream acknowledged, exactly as it would send an outbox; when it has
caught up it empties the file.

Both processes number events of one sequence (the trainer's ``seq``) and append them under one lock
(``flock`` on the journal, re-entrant within a process), so seq order is file order. The numbers
live in a small file mapped into both (``outbox.jsonl.state``), with what the control channel needs
across the two (the run's step, and whether it is finished or stopping) and whether the publisher
process is idle (which events wake it: ``runtime.publish.window``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from runtime.publish.outbox import Outbox, Record, encode

# one 8-byte slot per field, each written on its own: a read-modify-write of the whole state
# would put back a field the other process changed in between (a seq given out twice)
_FIELDS = ("seq", "step", "published", "attempt", "close_timeout", "sealed", "finished", "state", "commands", "idle")
_SLOT = 8
_INT, _FLOAT = struct.Struct("<q"), struct.Struct("<d")
_STATES = ("running", "paused", "stopping")


def state_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".state")


class Journal:
    """One process's handle on the journal file and the shared state beside it (see the module docstring)."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        """Open ``path``; ``fresh`` (the training process, once per attempt) starts the shared state at zero."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        state = state_path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        sfd = os.open(state, flags, 0o644)
        try:
            size = _SLOT * len(_FIELDS)
            if os.fstat(sfd).st_size < size:
                os.ftruncate(sfd, size)
            self._map = mmap.mmap(sfd, size)
        finally:
            os.close(sfd)
        self._mutex = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal lock: across processes (``flock``) and threads, re-entrant."""
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)

    held = locked  # a ``runtime.publish.sinks.Counter``: the stamper numbers and appends under this lock

    def append(self, records: list[Record]) -> None:
        """Append ``records`` in one write; on an error (a full disk) nothing of them stays."""
        view = memoryview(encode(records))
        written = 0
        with self.locked():
            try:
                while written < len(view):
                    written += os.write(self.fd, view[written:])
            except OSError:
                with contextlib.suppress(OSError):  # no fstat before the write: this is the hot path
                    os.truncate(self.path, os.fstat(self.fd).st_size - written)
                raise

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    # ---- the shared state ------------------------------------------------------------------

    def _get(self, index: int) -> int | float:
        kind = _FLOAT if index == 4 else _INT
        value: int | float = kind.unpack_from(self._map, index * _SLOT)[0]
        return value

    def _set(self, index: int, value: int | float) -> None:
        (_FLOAT if index == 4 else _INT).pack_into(self._map, index * _SLOT, value)

    @property
    def value(self) -> int:
        """The last seq given out (``runtime.publish.sinks.Counter``)."""
        return int(self._get(0))

    @value.setter
    def value(self, seq: int) -> None:
        self._set(0, seq)

    @property
    def step(self) -> int:
        return int(self._get(1))

    @step.setter
    def step(self, step: int) -> None:
        self._set(1, step)

    @property
    def published(self) -> int:
        """Events the publisher processes of this attempt saw acknowledged, all generations together."""
        return int(self._get(2))

    @published.setter
    def published(self, n: int) -> None:
        self._set(2, n)

    @property
    def attempt(self) -> int:
        """The attempt the trainer's stamper numbers (0 until it exists: the publisher process then records no event)."""
        return int(self._get(3))

    @attempt.setter
    def attempt(self, attempt: int) -> None:
        self._set(3, attempt)

    @property
    def close_timeout(self) -> float:
        return float(self._get(4))

    @close_timeout.setter
    def close_timeout(self, seconds: float) -> None:
        self._set(4, seconds)

    @property
    def sealed(self) -> bool:
        """``run.finished`` is out: nothing more of this attempt is appended."""
        return bool(self._get(5))

    @sealed.setter
    def sealed(self, flag: bool) -> None:
        self._set(5, int(flag))

    @property
    def finished(self) -> bool:
        return bool(self._get(6))

    @finished.setter
    def finished(self, flag: bool) -> None:
        self._set(6, int(flag))

    @property
    def state(self) -> str:
        """What the run will be once accepted commands are applied: running, paused or stopping."""
        return _STATES[int(self._get(7))]

    @state.setter
    def state(self, name: str) -> None:
        self._set(7, _STATES.index(name))

    @property
    def commands(self) -> int:
        """Commands written to the training process's pipe so far: it reads the pipe only when this moved."""
        return int(self._get(8))

    @commands.setter
    def commands(self, n: int) -> None:
        self._set(8, n)

    @property
    def idle(self) -> bool:
        """The publisher process has sent all it saw and waits for a byte on the wake pipe
        (``runtime.publish.window``): the next event that may wait rings; the others always do."""
        return bool(self._get(9))

    @idle.setter
    def idle(self, flag: bool) -> None:
        self._set(9, int(flag))


class JournalOutbox(Outbox):
    """The publisher process's view of the journal: an outbox another process appends to.

    It never cuts a torn last line (the writer may be half-way through it: the training process
    repairs the file when it opens it), loads complete lines only, and empties the file only under
    the journal lock, when everything written has been acknowledged.
    """

    def __init__(self, path: Path, journal: Journal) -> None:
        self.journal = journal
        super().__init__(path)

    def _cut_torn_tail(self) -> None:
        return None  # the writer's job, done before any publisher process starts

    def __len__(self) -> int:
        """Events not yet acknowledged (counted from the file: only the start and the end ask)."""
        return self._count_from(self.committed)

    def commit(self, end_offset: int, count: int) -> None:
        self.committed = end_offset
        if end_offset >= self.read_pos:
            with self.journal.locked():
                if self._size() == end_offset:  # nothing appended since: empty the file
                    self._emptied()
                    return
        self._write_offset(end_offset)
