"""How tests put events on the bus.

``OutboxPublisher`` is the quick way for a test that needs events in the stream (a recorded run, an
audit input): they go to an outbox file and reach JetStream through ``runtime.publish.replay``, the
sender a run's publisher process runs, when the test calls ``flush`` or ``close``. ``start_sink``
starts the trainer's own path, a ``PublisherSink`` with its publisher process, for tests about it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from producers.run.publishing import PUBLISHER
from runtime.bus.connect import BusTarget, Credentials
from runtime.publish.outbox import Outbox, Record, record_of
from runtime.publish.replay import send_outbox
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import PublisherStats
from runtime.settings import BusSettings, Settings
from schemas import Event


class OutboxPublisher:
    """An event sink for tests: ``publish`` keeps, ``flush``/``close`` send through the replay path."""

    def __init__(
        self, target: BusTarget, settings: Settings, *, outbox_path: Path, credentials: Credentials | None = None
    ) -> None:
        self.target, self.settings, self.path, self.credentials = target, settings, outbox_path, credentials
        self.stats = PublisherStats()
        self._records: list[Record] = []

    def publish(self, event: Event) -> None:
        self._records.append(record_of(event))

    def flush(self, timeout: float = 30.0) -> bool:
        """Send everything published so far; True when nothing is left in the outbox."""
        if self._records:
            box = Outbox(self.path)
            box.append(self._records)
            box.close()
            self._records = []
        if not self.path.exists():
            return True
        with ThreadPoolExecutor(1) as pool:  # a thread of its own: the test may be running an event loop
            stats = pool.submit(
                send_outbox, self.target, self.settings, self.path, timeout=timeout, credentials=self.credentials
            ).result()
        for key in ("published", "duplicates", "dead_lettered", "trimmed", "retried"):
            setattr(self.stats, key, getattr(self.stats, key) + getattr(stats, key))
        self.stats.outbox_pending = stats.outbox_pending
        return stats.outbox_pending == 0

    def close(self, timeout: float = 30.0) -> PublisherStats:
        self.flush(timeout)
        return self.stats


def start_sink(url: str, outbox: Path, run_id: str, **options: Any) -> PublisherSink:
    """A started ``PublisherSink`` (no control channel) on ``url``; ``bus=`` overrides bus settings."""
    settings = Settings(bus=BusSettings(url=url, **options.pop("bus", {})))
    return PublisherSink(
        BusTarget([url], "test"), settings, outbox_path=outbox, argv=PUBLISHER, run_id=run_id, control=False, **options
    ).start()
