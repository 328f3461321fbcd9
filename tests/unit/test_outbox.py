"""The outbox file keeps unacknowledged events in order across restarts."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest

from runtime.publish import outbox as outbox_module
from runtime.publish.outbox import Outbox


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


GOOD = b"".join(f"trainbus.events.r.train.step\tr.1.{i}\t".encode() + b'{"seq":%d}\n' % i for i in range(3))


def test_a_last_line_cut_before_its_tab_is_cut_off_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(GOOD + b"trainbus.events.r.tra")  # killed mid-append
    box = Outbox(path)
    assert len(box) == 3
    box.append(records(1, start=3))
    assert [r[1] for r, _ in box.load(10)] == ["r.1.0", "r.1.1", "r.1.2", "r.1.3"]
    assert b"trainbus.events.r.tra" in box.dead.path.read_bytes()  # set aside, not silently dropped


def test_a_line_torn_inside_the_json_is_not_glued_to_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(GOOD + b'trainbus.events.r.train.step\tr.1.3\t{"se')
    box = Outbox(path)
    box.append(records(2, start=4))
    loaded = box.load(10)
    assert [r[1] for r, _ in loaded] == ["r.1.0", "r.1.1", "r.1.2", "r.1.4", "r.1.5"]
    assert all(data.startswith(b"{") and data.endswith(b"}") for (_, _, data), _ in loaded)
    box.commit(loaded[-1][1], len(loaded))
    assert len(box) == 0 and path.stat().st_size == 0  # the file empties once everything is acked


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(GOOD + b'trainbus.events.r.train.step\tr.1.3\t{"seq":3}')
    box = Outbox(path)
    box.append(records(1, start=4))
    assert [r[1] for r, _ in box.load(10)] == ["r.1.0", "r.1.1", "r.1.2", "r.1.3", "r.1.4"]


def test_glued_lines_from_an_older_outbox_are_set_aside_not_published(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    glued = b'trainbus.events.r.train.step\tr.1.3\t{"se' + b'trainbus.events.r.train.step\tr.1.4\t{"seq":4}\n'
    path.write_bytes(GOOD + glued + b'trainbus.events.r.train.step\tr.1.5\t{"seq":5}\n')
    box = Outbox(path)
    loaded = box.load(10)
    assert [r[1] for r, _ in loaded] == ["r.1.0", "r.1.1", "r.1.2", "r.1.5"]
    box.commit(loaded[-1][1], len(loaded))
    assert len(box) == 0 and path.stat().st_size == 0
    assert b"r.1.3" in box.dead.path.read_bytes()  # set aside, not published as an invalid event


def test_a_full_disk_mid_append_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    box.append(records(2))
    size = path.stat().st_size
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))  # room for 20 more bytes: "the disk is full"
    try:
        with pytest.raises(OSError):
            box.append(records(2, start=2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes().endswith(b"\n") and len(box) == 2
    box.append(records(2, start=2))  # space again: the retried append is whole
    assert [r[1] for r, _ in Outbox(path).load(10)] == ["r.1.0", "r.1.1", "r.1.2", "r.1.3"]


def test_an_event_longer_than_one_read_is_loaded_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "CHUNK", 16)  # every line is longer than a read
    box = Outbox(tmp_path / "outbox.jsonl")
    box.append(records(3))
    loaded = []
    while more := box.load(10):  # at least one whole line a read, whatever its length
        loaded += more
    assert [r[1] for r, _ in loaded] == ["r.1.0", "r.1.1", "r.1.2"]
    box.commit(loaded[-1][1], 3)
    assert len(box) == 0
