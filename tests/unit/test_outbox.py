"""The outbox file keeps unacknowledged events in order across restarts."""

from __future__ import annotations

from pathlib import Path

from runtime.outbox import Outbox


def records(n: int, start: int = 0) -> list[tuple[str, str, bytes]]:
    return [("trainbus.events.r.train.step", f"r.1.{i}", b'{"seq":%d}' % i) for i in range(start, start + n)]


def test_append_load_commit_and_truncate(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.jsonl")
    box.append(records(5))
    assert len(box) == 5
    loaded = box.load(3)
    assert [r[1] for r, _ in loaded] == ["r.1.0", "r.1.1", "r.1.2"]
    box.commit(loaded[-1][1], 3)
    assert len(box) == 2
    reopened = Outbox(tmp_path / "outbox.jsonl")  # a crash here re-sends only the unacknowledged rest
    assert [r[1] for r, _ in reopened.load(10)] == ["r.1.3", "r.1.4"]
    rest = box.load(10)
    box.commit(rest[-1][1], 2)
    assert len(box) == 0 and (tmp_path / "outbox.jsonl").stat().st_size == 0


def test_rewrite_puts_older_memory_events_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.jsonl")
    box.append(records(2, start=10))
    box.rewrite(records(3))
    assert len(box) == 5
    assert [r[1] for r, _ in Outbox(tmp_path / "outbox.jsonl").load(10)] == [
        "r.1.0",
        "r.1.1",
        "r.1.2",
        "r.1.10",
        "r.1.11",
    ]
