"""A file of events not yet acknowledged by JetStream, in publish order.

One line per event: ``subject<TAB>msg_id<TAB>json``. A separate offset file records how far
the file has been acknowledged, so a crash re-sends only what may be missing (JetStream drops
the duplicates by ``Nats-Msg-Id``).
"""

from __future__ import annotations

import os
from pathlib import Path

Record = tuple[str, str, bytes]


class Outbox:
    """Append-only spill file with a committed read offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append = path.open("ab")
        self.committed = self._read_offset()
        self.read_pos = self.committed
        self.pending = self._count_from(self.committed)

    def _read_offset(self) -> int:
        try:
            value = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
        return min(value, self.path.stat().st_size)

    def _count_from(self, pos: int) -> int:
        with self.path.open("rb") as f:
            f.seek(pos)
            return sum(1 for line in f if line.strip())

    def __len__(self) -> int:
        return self.pending

    def append(self, records: list[Record]) -> None:
        """Spill ``records`` to the end of the file."""
        self._append.write(b"".join(f"{s}\t{m}\t".encode() + d + b"\n" for s, m, d in records))
        self._append.flush()
        self.pending += len(records)

    def load(self, limit: int) -> list[tuple[Record, int]]:
        """Read up to ``limit`` records after what was already loaded; each with its end offset."""
        out: list[tuple[Record, int]] = []
        self._append.flush()
        with self.path.open("rb") as f:
            f.seek(self.read_pos)
            while len(out) < limit:
                line = f.readline()
                if not line:
                    break
                self.read_pos += len(line)
                body = line.rstrip(b"\n")
                if not body:
                    continue
                subject, msg_id, data = body.split(b"\t", 2)
                out.append(((subject.decode(), msg_id.decode(), data), self.read_pos))
        return out

    def commit(self, end_offset: int, count: int) -> None:
        """Mark everything before ``end_offset`` as acknowledged; truncate when all is sent."""
        self.committed = end_offset
        self.pending = max(0, self.pending - count)
        if self.pending == 0 and self.read_pos >= self.path.stat().st_size:
            self._append.truncate(0)
            self._append.seek(0)
            self.committed = self.read_pos = 0
            self.offset_path.unlink(missing_ok=True)
            return
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(end_offset))
        tmp.replace(self.offset_path)

    def rewind(self) -> None:
        """Forget loaded-but-unacknowledged records so they are loaded again."""
        self.read_pos = self.committed

    def rewrite(self, head: list[Record]) -> None:
        """Put ``head`` (older, never spilled) before the unacknowledged rest, durably."""
        self._append.flush()
        with self.path.open("rb") as f:
            f.seek(self.committed)
            rest = f.read()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(f"{s}\t{m}\t".encode() + d + b"\n" for s, m, d in head))
            f.write(rest)
            f.flush()
            os.fsync(f.fileno())
        self._append.close()
        tmp.replace(self.path)
        self.offset_path.unlink(missing_ok=True)
        self._append = self.path.open("ab")
        self.committed = self.read_pos = 0
        self.pending += len(head)

    def close(self) -> None:
        self._append.close()
        if self.path.exists() and self.path.stat().st_size == 0:
            self.path.unlink()
            self.offset_path.unlink(missing_ok=True)
