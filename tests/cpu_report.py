"""Per-test-file CPU, for keeping the suite inside its time budget (`make test-cpu`).

Loaded with ``-p tests.cpu_report``; each pytest process (the xdist workers included) appends one
JSON line per test file to ``$TRAINBUS_CPU_REPORT``: wall seconds, and the CPU seconds spent by the
process itself and by every process it started (trainers, servers, consumers), whether they
ended during the file or still run. ``python -m tests.cpu_report FILE`` prints the table, most
expensive first. Under ``--dist loadfile`` a worker runs one file at a time, so a file's CPU is
what its worker and that worker's children spent meanwhile.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

_started: dict[str, tuple[float, float, float]] = {}


def _descendants_cpu() -> float:
    """CPU of every process this one started: what reaped ones spent, plus live ones so far.

    The difference of two readings is what they spent in between, also for a process that was
    alive at the first and reaped by the second (its whole CPU then counts as reaped).
    """
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


def _self_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    path = str(item.path.relative_to(item.config.rootpath))
    if not _started:  # the first test of this process: what starting and collecting cost
        _write(
            {
                "file": "(start-up and collection)",
                "wall": time.time() - psutil.Process().create_time(),
                "self": _self_cpu(),
                "children": _descendants_cpu(),
            }
        )
    if path not in _started:
        _started[path] = (time.monotonic(), _self_cpu(), _descendants_cpu())
    yield
    if nextitem is None or str(nextitem.path.relative_to(item.config.rootpath)) != path:
        _flush(path)


def _flush(path: str) -> None:
    wall0, own0, kids0 = _started[path]
    kids = _descendants_cpu()
    _write({"file": path, "wall": time.monotonic() - wall0, "self": _self_cpu() - own0, "children": kids - kids0})


def _write(row: dict[str, object]) -> None:
    target = os.environ.get("TRAINBUS_CPU_REPORT")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(row) + "\n")


def table(report: Path) -> str:
    """The rows of ``report`` summed per file, most CPU first, with the total."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: {"wall": 0.0, "self": 0.0, "children": 0.0})
    for line in report.read_text().splitlines():
        row = json.loads(line)
        for key in ("wall", "self", "children"):
            rows[row["file"]][key] += row[key]
    ordered = sorted(rows.items(), key=lambda kv: -(kv[1]["self"] + kv[1]["children"]))
    lines = [f"{'file':<62} {'wall s':>7} {'CPU s':>7} {'tests':>6} {'children':>8}"]
    for name, r in ordered:
        lines.append(
            f"{name:<62} {r['wall']:>7.1f} {r['self'] + r['children']:>7.1f} {r['self']:>6.1f} {r['children']:>8.1f}"
        )
    cpu = sum(r["self"] + r["children"] for r in rows.values())
    lines.append(f"{'total':<62} {sum(r['wall'] for r in rows.values()):>7.1f} {cpu:>7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
