"""``open_bus``: the run's publisher process, with the control responder, on the bus every command finds.

The training process keeps none of the bus: ``PublisherSink`` (``runtime.publish.sink``) appends events
to the run's outbox file and the run's publisher process (``producers.run.publisher``) publishes them
and answers commands, which reach the training thread through ``channel`` (its link becomes a
``PipeLink``). Used by ``trainbus train`` (which fails fast when the bus is unreachable, unless
``publish.offline_ok``) and by ``TrainbusCallback`` in someone's own script (which always may
start offline).
"""

from __future__ import annotations

import sys
from pathlib import Path

from producers.run.control_inbox import ControlChannel, PipeLink
from runtime.bus.connect import resolve_target
from runtime.publish.sink import WINDOW_S, PublisherSink
from runtime.settings import Settings

PUBLISHER = [sys.executable, "-m", "producers.run.publisher"]
"""How a training run starts its publisher process."""


def open_bus(
    run_id: str,
    settings: Settings,
    outbox_path: Path,
    channel: ControlChannel | None,
    *,
    offline_ok: bool = False,
    window: float = WINDOW_S,
) -> PublisherSink:
    """Start the run's publisher process (and its control responder); ``BusUnavailable`` if the bus is
    unreachable, unless ``offline_ok``: then it starts offline and connects in the background.
    ``window``: seconds an event that may wait waits for others (``runtime.publish.window``)."""
    target = resolve_target(settings)
    sink = PublisherSink(
        target,
        settings,
        outbox_path=outbox_path,
        argv=PUBLISHER,
        run_id=run_id,
        name=f"trainbus-{run_id}",
        control=channel is not None,
        offline_ok=offline_ok,
        owns_server=True,  # an embedded server started for this run stops with it; its store keeps the events
        window=window,
    )
    try:
        sink.start()
    except BaseException:
        if target.server is not None:
            target.server.stop()
        raise
    if channel is not None:
        channel.link = PipeLink(sink.counter, read_fd=sink.commands_fd, write_fd=sink.commands_w)
    return sink
