"""A file of events not yet acknowledged by JetStream, in publish order, and the dead-letter file beside it.

One line per event: ``subject<TAB>msg_id<TAB>json``. A separate offset file records how far
the file has been acknowledged, so a crash re-sends only what may be missing (JetStream drops
the duplicates by ``Nats-Msg-Id``).

The file is read defensively, because a kill or a full disk can leave half a line: a torn last
line is cut off when the file is opened (and set aside, and reported), so appends always start
on a fresh line; an append that fails half-way is undone; a malformed line left by an older
version is set aside when it is reached instead of being published or killing the reader.

``DeadLetters`` (``outbox.dead.jsonl`` beside ``outbox.jsonl``) keeps, one JSON object a line,
what cannot be sent: events the bus refuses for good (too large, no stream, permission denied)
and unreadable outbox lines. Nothing there is retried; a person decides what to do with it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.logs import get_logger
from schemas import Event
from schemas.subjects import event_subject

Record = tuple[str, str, bytes]
CHUNK = 1 << 20
"""Bytes read from the file at a time (more when one event is longer)."""


def record_of(event: Event) -> Record:
    """The outbox/bus form of ``event``: subject, msg id, JSON."""
    return event_subject(event.run_id, event.type), event.event_id, event.model_dump_json().encode()


def encode(records: list[Record]) -> bytes:
    """Outbox lines for ``records``."""
    return b"".join(f"{s}\t{m}\t".encode() + d + b"\n" for s, m, d in records)


def parse_line(body: bytes) -> Record | None:
    """The record on one outbox line (without its newline), or None when the line is malformed."""
    parts = body.split(b"\t")
    if len(parts) != 3:  # event JSON never holds a raw tab: more fields means lines glued together
        return None
    subject, msg_id, data = parts
    if not subject or not msg_id or not (data.startswith(b"{") and data.endswith(b"}")):
        return None
    try:
        return subject.decode(), msg_id.decode(), data
    except UnicodeDecodeError:
        return None


def _complete(body: bytes) -> bool:
    record = parse_line(body)
    if record is None:
        return False
    try:
        json.loads(record[2])
    except ValueError:
        return False
    return True


def dead_letter_path(outbox: Path) -> Path:
    """``runs/x/outbox.jsonl`` → ``runs/x/outbox.dead.jsonl``."""
    return outbox.with_name(f"{outbox.stem}.dead{outbox.suffix or '.jsonl'}")


class DeadLetters:
    """Append-only file of what could not be sent, each with the reason; created on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def add(self, record: Record, reason: str) -> None:
        """Set aside one event (its subject, id and JSON text) with ``reason``."""
        subject, msg_id, data = record
        self._write({"reason": reason, "subject": subject, "event_id": msg_id, "event": data.decode(errors="replace")})

    def add_raw(self, raw: bytes, reason: str) -> None:
        """Set aside bytes that are not a readable outbox line."""
        self._write({"reason": reason, "raw": raw.decode(errors="replace")})

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(), **entry}).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


class Outbox:
    """Append-only file of unacknowledged events with a committed read offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.dead = DeadLetters(dead_letter_path(path))
        self.log = get_logger(component="outbox", path=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: a failed append is undone exactly, and nothing half-written waits in a buffer
        self._append = path.open("ab", buffering=0)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # pread: no buffer a truncation could leave stale
        self._cut_torn_tail()
        self.committed = self._read_offset()
        self._offset_written = self.offset_path.exists()
        self.read_pos = self.committed
        self.pending = self._count_from(self.committed)

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def _cut_torn_tail(self) -> None:
        """A last line without its newline: keep it if it is a whole record, else set it aside and cut it."""
        size = self._size()
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        start, pos = 0, size
        while pos > 0:  # the start of the last line, reading backwards
            step = min(1 << 16, pos)
            pos -= step
            idx = os.pread(self._fd, step, pos).rfind(b"\n")
            if idx >= 0:
                start = pos + idx + 1
                break
        tail = os.pread(self._fd, size - start, start)
        if _complete(tail):
            self._append.write(b"\n")  # only the newline was missing
            return
        self.dead.add_raw(tail, "torn last line of the outbox (a write interrupted by a kill or a full disk)")
        os.truncate(self.path, start)
        self.log.warning("outbox had a torn last line; cut it off", bytes=len(tail), set_aside_in=str(self.dead.path))

    def _read_offset(self) -> int:
        try:
            value = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
        return min(value, self._size())

    def _count_from(self, pos: int) -> int:
        with self.path.open("rb") as f:
            f.seek(pos)
            return sum(1 for line in f if parse_line(line.rstrip(b"\n")) is not None)

    def __len__(self) -> int:
        return self.pending

    def has_new(self) -> bool:
        """Whether the file holds bytes past what was loaded (another process may append)."""
        return self._size() > self.read_pos

    def append(self, records: list[Record]) -> None:
        """Add ``records`` to the end of the file; on an error (a full disk) nothing of them stays."""
        data = memoryview(encode(records))
        start = self._size()
        try:
            while data:
                written = self._append.write(data)
                data = data[written or 0 :]
        except OSError:
            try:
                os.truncate(self.path, start)
            except OSError as exc:
                self.log.error("cannot undo a partial append", error=str(exc))
            raise
        self.pending += len(records)

    def _complete_lines(self) -> bytes:
        """The complete lines after ``read_pos`` (at least one whole line, whatever its size), one read."""
        available = self._size() - self.read_pos
        size = min(available, CHUNK)
        while True:
            chunk = os.pread(self._fd, size, self.read_pos)
            end = chunk.rfind(b"\n") + 1
            if end or size >= available:
                return chunk[:end]
            size = min(available, size * 2)  # one event longer than a chunk

    def load(self, limit: int) -> list[tuple[Record, int]]:
        """Read up to ``limit`` records after what was already loaded; each with its end offset."""
        out: list[tuple[Record, int]] = []
        chunk = self._complete_lines()
        base, start, skipped = self.read_pos, 0, False
        while len(out) < limit and start < len(chunk):
            newline = chunk.index(b"\n", start)
            body, start = chunk[start:newline], newline + 1
            if not body.strip():
                continue
            record = parse_line(body)
            if record is None:
                skipped = True
                self.dead.add_raw(body, "malformed outbox line (torn or glued by an interrupted write)")
                self.log.warning("malformed outbox line set aside", set_aside_in=str(self.dead.path))
                continue
            out.append((record, base + start))
        self.read_pos = base + start
        if skipped and not out:
            self.commit(self.read_pos, 0)
        return out

    def commit(self, end_offset: int, count: int) -> None:
        """Mark everything before ``end_offset`` as acknowledged; truncate when all is sent."""
        self.committed = end_offset
        self.pending = max(0, self.pending - count)
        if self.pending == 0 and self.read_pos >= self._size():
            self._emptied()
            return
        self._write_offset(end_offset)

    def _emptied(self) -> None:
        self._append.truncate(0)
        self.committed = self.read_pos = 0
        if self._offset_written:
            self.offset_path.unlink(missing_ok=True)
            self._offset_written = False

    def _write_offset(self, end_offset: int) -> None:
        # fixed width, written in place: one write that always covers the whole number
        fd = os.open(self.offset_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, b"%020d\n" % end_offset, 0)
        finally:
            os.close(fd)
        self._offset_written = True

    def rewind(self) -> None:
        """Forget loaded-but-unacknowledged records so they are loaded again."""
        self.read_pos = self.committed

    def close(self) -> None:
        self._append.close()
        os.close(self._fd)
        if self.path.exists() and self.path.stat().st_size == 0:
            self.path.unlink()
            self.offset_path.unlink(missing_ok=True)
