"""``open_bus``: the run's ``NatsPublisher``, with the control responder, on the bus every command finds.

Used by ``trainbus train`` (which fails fast when the bus is unreachable, unless
``publish.offline_ok``) and by ``TrainbusCallback`` in someone's own script (which always may
start offline).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from producers.control import ControlChannel
from runtime.bus import resolve_target
from runtime.publisher import NatsPublisher
from runtime.settings import Settings
from schemas import control_subject


def open_bus(
    run_id: str,
    settings: Settings,
    outbox_path: Path,
    channel: ControlChannel | None,
    memory_limit: int = 10_000,
    *,
    offline_ok: bool = False,
) -> NatsPublisher:
    """Connect the run's publisher (and its control responder); ``BusUnavailable`` if unreachable,
    unless ``offline_ok``: then it starts offline and connects in the background."""
    responders: dict[str, Callable[[bytes], bytes]] = (
        {control_subject(run_id): channel.handle} if channel is not None else {}
    )
    # The bus thread needs the GIL to answer a command or publish; with Python's default 5 ms
    # switch interval it can wait that long behind the training thread's Python code.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
    target = resolve_target(settings)
    publisher = NatsPublisher(
        target,
        settings,
        outbox_path=outbox_path,
        memory_limit=memory_limit,
        name=f"trainbus-{run_id}",
        responders=responders,
        offline_ok=offline_ok,
        owns_server=True,  # an embedded server started for this run stops with it; its store keeps the events
    )
    try:
        publisher.start()
    except BaseException:
        if target.server is not None:
            target.server.stop()
        raise
    return publisher
