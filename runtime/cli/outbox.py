"""`trainbus outbox flush [RUN]`: send the events runs left in their outboxes.

    trainbus outbox flush              # every outbox under runs/
    trainbus outbox flush my-run       # only my-run's
    trainbus outbox flush --dir out/   # runs trained with training.output_dir=out/

A run's outbox is otherwise sent only by a later attempt of the same run (``--resume``). Each
outbox goes through the sender a run's publisher process runs (``runtime.publish.replay``: the same
order, ``Nats-Msg-Id`` dedupe and dead-letter handling), so what was already stored is dropped by
JetStream and nothing is sent twice. An outbox still open in a live process (its trainer) is left
to it. A run whose events were all sent has nothing left to send, which is not an error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import psutil

from runtime.bus.connect import BusTarget, bus_target
from runtime.cli.args import add_settings_args, run_id_arg, settings_from
from runtime.errors import NotFound, TrainbusError
from runtime.publish.outbox import Outbox, dead_letter_path
from runtime.publish.replay import send_outbox
from runtime.settings import Settings

CLOSE_TIMEOUT = 60.0
"""Seconds one outbox may take to send before the rest is left in it for the next flush."""


def register(sub: Any) -> None:
    p = sub.add_parser("outbox", help="events a run could not send yet")
    inner = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION", parser_class=type(p))
    f = inner.add_parser("flush", help="send the outboxes runs left behind (all runs, or RUN)")
    f.add_argument("run", nargs="?", type=run_id_arg, help="only this run")
    f.add_argument(
        "--dir", default="runs", metavar="DIR", help="where the runs are (training.output_dir; default runs)"
    )
    add_settings_args(f)
    f.set_defaults(func=cmd_outbox_flush)


def find_outboxes(root: Path, run_id: str | None = None) -> list[Path]:
    """Outboxes under ``root``: ``<run>/outbox.jsonl`` (`trainbus train`) and ``outbox-<run>.jsonl`` (the callback)."""
    if run_id is not None:
        candidates = [root / run_id / "outbox.jsonl", root / f"outbox-{run_id}.jsonl"]
    else:
        candidates = sorted([*root.glob("*/outbox.jsonl"), *root.glob("outbox-*.jsonl")])
    return [p for p in candidates if p.is_file() and p.stat().st_size > 0]


def holder(path: Path) -> int | None:
    """The pid of a process of this user that has ``path`` open (a trainer still sending it), if any."""
    target, me = str(path.resolve()), os.getpid()
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and any(f.path == target for f in proc.open_files()):
                return int(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


def pending(path: Path) -> int:
    """Events waiting in the outbox at ``path``."""
    box = Outbox(path)
    try:
        return len(box)
    finally:
        box.close()


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    root = Path(args.dir)
    found = find_outboxes(root, args.run)
    if not found:
        print(_nothing_left(root, args.run))
        return 0
    left_total = 0
    with bus_target(settings) as target:
        for path in found:
            left_total += _flush_one(target, settings, path)
    if left_total:
        raise TrainbusError(f"{left_total} events are still in outboxes; run `trainbus outbox flush` again later")
    return 0


def _nothing_left(root: Path, run_id: str | None) -> str:
    """What to say when no outbox holds events; ``NotFound`` when ``run_id`` never ran under ``root``."""
    if run_id is None:
        return f"no outbox with events under {root}/: nothing left to send"
    if not (root / run_id).is_dir():
        raise NotFound(f"no run {run_id!r} under {root}/ (neither {root / run_id}/ nor an outbox of it)")
    return f"run {run_id}: nothing left to send"


def _flush_one(target: BusTarget, settings: Settings, path: Path) -> int:
    """Send one outbox, print what happened; returns how many events are left in it."""
    pid = holder(path)
    if pid is not None:
        print(f"{path}: skipped, open in process {pid} (its trainer sends it)")
        return 0
    waiting = pending(path)
    if waiting == 0:
        print(f"{path}: nothing left to send")
        return 0
    stats = send_outbox(target, settings, path, timeout=CLOSE_TIMEOUT)
    sent = stats.published - stats.duplicates
    parts = [f"{sent} sent", f"{stats.duplicates} already stored"]
    if stats.dead_lettered:
        parts.append(f"{stats.dead_lettered} refused for good (in {dead_letter_path(path)})")
    parts.append(f"{stats.outbox_pending} left")
    print(f"{path}: {waiting} events: {', '.join(parts)}")
    return stats.outbox_pending
