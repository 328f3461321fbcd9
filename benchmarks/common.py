"""What every benchmark shares: percentiles and a child process's log tail."""

from __future__ import annotations

from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank: what every benchmark reports as p50/p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` of a child process's log on one line, for an error message."""
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"
