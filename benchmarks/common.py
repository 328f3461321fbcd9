"""What every benchmark shares: percentiles, a child process's log tail, and the trainer's publish path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from producers.run.publishing import PUBLISHER
from runtime.bus.connect import BusTarget
from runtime.publish.sink import PublisherSink
from runtime.settings import Settings


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank: what every benchmark reports as p50/p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` of a child process's log on one line, for an error message."""
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


def trainer_sink(target: BusTarget, settings: Settings, outbox: Path, run_id: str, **options: Any) -> PublisherSink:
    """A started ``PublisherSink`` with its publisher process: the path a training run's events take."""
    return PublisherSink(
        target, settings, outbox_path=outbox, argv=PUBLISHER, run_id=run_id, control=False, **options
    ).start()
