"""Fitting an event into the bus's ``max_payload``: its largest free-form parts are trimmed, visibly.

A run's config snapshot can be megabytes (a long system prompt, a big label file), while a NATS
server takes 1 MiB per message by default and managed services often less. Rather than losing
the whole ``run.started``, the parts that take any JSON object (``config``, ``applied``) or any
text are replaced, largest first, by a marker that says what was cut, until the event fits. The
result must still parse as the same event type; when no trimming makes it fit, the caller sets
the event aside whole (``fit`` returns None).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from schemas import parse_event

MARKER = "trainbus_trimmed"
HEADER_ROOM = 64
"""Bytes a message's headers take besides the ``Nats-Msg-Id`` value (the server counts them in max_payload)."""
_ENVELOPE = {"type", "event_id", "run_id", "attempt", "seq", "source", "time", "schema_version"}


def room(max_payload: int, msg_id: str) -> int:
    """Bytes left for the event JSON in a message with ``msg_id`` on a server with ``max_payload``."""
    return max_payload - HEADER_ROOM - len(msg_id.encode())


def _note(size: int, limit: int) -> str:
    return (
        f"{size} bytes trimmed: the event did not fit the bus's max_payload ({limit} bytes for the event); "
        "the whole event is in the dead-letter file beside the outbox"
    )


def fit(data: bytes, limit: int) -> bytes | None:
    """``data`` (an event's JSON) trimmed to at most ``limit`` bytes, or None when it cannot be."""
    try:
        obj: Any = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    sizes = {k: len(json.dumps(v)) for k, v in obj.items() if k not in _ENVELOPE and isinstance(v, dict | str)}
    for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
        original = obj[key]
        note = _note(sizes[key], limit)
        obj[key] = {MARKER: note} if isinstance(original, dict) else f"{original[:200]} …[{note}]"
        candidate = json.dumps(obj, separators=(",", ":")).encode()
        try:
            parse_event(candidate)
        except ValidationError:
            obj[key] = original  # this field cannot hold a marker (e.g. a pattern or a length limit)
            continue
        if len(candidate) <= limit:
            return candidate
    return None
