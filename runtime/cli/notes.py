"""`trainbus tag RUN k=v` and `trainbus note RUN "text"`: labels and notes in a run's own stream.

Both publish an event (``run.tag``, ``run.note``, source ``user``) as the run's next user event, so
every reader (runs, dashboard, exporter) sees them where they see the run; it goes out with
``runtime.publish.direct.publish_event``.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import nats.js.errors
from pydantic import ValidationError

from runtime.bus.connect import BusTarget, bus_target, issuer
from runtime.bus.stream import jetstream
from runtime.cli.args import add_settings_args, run_id_arg, settings_from
from runtime.errors import ConfigError, NotFound
from runtime.publish.direct import event_id, publish_event
from runtime.settings import Settings
from schemas import EVENTS_STREAM, RunNote, RunTag, event_subject, parse_event


def register_tag(sub: Any) -> None:
    p = sub.add_parser("tag", help="label a run: trainbus tag RUN team=risk dataset=v2 (KEY= removes)")
    p.add_argument("run", type=run_id_arg, help="run id")
    p.add_argument("tags", nargs="+", metavar="KEY=VALUE", help="tags to set; an empty value removes the key")
    add_settings_args(p)
    p.set_defaults(func=cmd_tag)


def register_note(sub: Any) -> None:
    p = sub.add_parser("note", help='write a note into a run\'s event stream: trainbus note RUN "text"')
    p.add_argument("run", type=run_id_arg, help="run id")
    p.add_argument("text", help="the note")
    add_settings_args(p)
    p.set_defaults(func=cmd_note)


def cmd_tag(args: argparse.Namespace) -> int:
    tags = {}
    for item in args.tags:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected KEY=VALUE, e.g. dataset=v2")
        tags[key] = value
    event = _publish_annotation(args, RunTag, tags=tags)
    print(tag_message(event.run_id, tags))
    return 0


def tag_message(run_id: str, tags: dict[str, str]) -> str:
    """``tagged run R: k=v`` for the keys set and ``removed tag k`` for those an empty value removed."""
    added = " ".join(f"{k}={v}" for k, v in tags.items() if v)
    removed = " ".join(k for k, v in tags.items() if not v)
    if not removed:
        return f"tagged run {run_id}: {added}"
    noun = "tags" if " " in removed else "tag"
    return (
        f"tagged run {run_id}: {added}; removed {noun} {removed}"
        if added
        else f"removed {noun} {removed} from run {run_id}"
    )


def cmd_note(args: argparse.Namespace) -> int:
    event = _publish_annotation(args, RunNote, text=args.text)
    print(f"noted on run {event.run_id} (event {event.event_id})")
    return 0


def _publish_annotation(args: argparse.Namespace, cls: type[RunTag | RunNote], **fields: Any) -> RunTag | RunNote:
    settings = settings_from(args)
    kind = cls.model_fields["type"].default
    try:
        event = cls(event_id=event_id(args.run, "user", kind.split(".")[1], uuid.uuid4().hex[:12]), run_id=args.run,
                    seq=1, source="user", issued_by=issuer(), **fields)  # fmt: skip
    except ValidationError as exc:  # a tag key or a note out of bounds
        first = exc.errors()[0]
        raise ConfigError(f"{kind}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    with bus_target(settings) as target:
        return asyncio.run(_annotate(target, settings, event))


async def _annotate(target: BusTarget, settings: Settings, event: RunTag | RunNote) -> RunTag | RunNote:
    """Publish a ``run.tag``/``run.note`` as the next event of its run (see ``RunTag``'s numbering)."""
    async with jetstream(target, settings, "trainbus-annotate") as nc:
        js = nc.jetstream()
        try:
            started = await js.get_last_msg(EVENTS_STREAM, event_subject(event.run_id, "run.started"))
        except nats.js.errors.NotFoundError:
            raise NotFound(f"no run {event.run_id!r} in the stream (see `trainbus runs`)") from None
        attempt = parse_event(started.data or b"").attempt
        seq = 0
        for kind in ("run.tag", "run.note"):
            try:
                last = await js.get_last_msg(EVENTS_STREAM, event_subject(event.run_id, kind))
                seq = max(seq, parse_event(last.data or b"").seq)
            except (nats.js.errors.NotFoundError, ValueError):
                pass
        stamped = event.model_copy(update={"attempt": attempt, "seq": seq + 1})
        await publish_event(js, stamped)
        return stamped
