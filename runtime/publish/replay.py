"""Sending an outbox a run left behind (`trainbus outbox flush`), with the publisher process's ``Sender``.

The same order, ``Nats-Msg-Id`` de-duplication, trimming and dead letters as a training run's
publisher process: what JetStream already stored is dropped as a duplicate, so nothing is sent twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from runtime.bus.connect import BusTarget, Credentials
from runtime.logs import get_logger
from runtime.publish.outbox import Outbox
from runtime.publish.sender import Sender
from runtime.publish.sinks import PublisherStats
from runtime.publish.window import Window
from runtime.settings import Settings


def send_outbox(
    target: BusTarget,
    settings: Settings,
    path: Path,
    *,
    timeout: float,
    name: str = "trainbus-outbox-flush",
    credentials: Credentials | None = None,
    provision_stream: bool = True,
) -> PublisherStats:
    """Send the outbox at ``path`` for up to ``timeout`` s; what is not acknowledged by then stays in it.

    Raises ``BusUnavailable`` when the bus cannot be reached.
    """
    window = Window()
    window.close(timeout)  # send what is there, then stop
    stats = PublisherStats()
    sender = Sender(
        target, settings, window, stats, get_logger(component="publisher", outbox=str(path)),
        outbox=Outbox(path), name=name, credentials=credentials, provision_stream=provision_stream,
    )  # fmt: skip
    asyncio.run(sender.run())
    return stats
