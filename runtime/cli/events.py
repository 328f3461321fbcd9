"""`trainbus events --run RUN`: replay one run's events from the start, and follow live ones.

``--type``, ``--since`` and ``--no-heartbeats`` filter; ``--json`` prints the stored JSON lines,
``--csv`` one column per field for a spreadsheet or pandas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import nats.js.errors

from runtime.bus.connect import BusTarget, bus_target
from runtime.bus.stream import Delivered, NewerEvents, jetstream, replay, run_ids
from runtime.cli.args import add_settings_args, choices_arg, run_id_arg, settings_from, since_arg
from runtime.cli.render import event_row, flat, write_csv
from runtime.errors import ConfigError, NotFound
from runtime.settings import Settings
from schemas import EVENT_TYPES, Event, run_events


def register(sub: Any) -> None:
    p = sub.add_parser("events", help="replay a run's events from the start (and follow live ones)")
    p.add_argument("--run", required=True, type=run_id_arg, help="run id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing live events")
    p.add_argument("--type", dest="types", action="append", type=choices_arg(tuple(EVENT_TYPES), "event type"),
                   metavar="TYPE[,TYPE]", help="only these event types, e.g. train.step,eval")  # fmt: skip
    p.add_argument("--since", type=since_arg, metavar="WHEN", help="only events after WHEN: 10m, 2h, 1d or an ISO time")
    p.add_argument("--no-heartbeats", action="store_true", help="leave heartbeat events out")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV with one column per field (not with --follow)")
    add_settings_args(p)
    p.set_defaults(func=cmd_events)


def event_filter(args: argparse.Namespace) -> Callable[[Event], bool]:
    """Whether an event passes the command's ``--type``, ``--since`` and ``--no-heartbeats``."""
    types = {t for group in args.types or [] for t in group}

    def keep(event: Event) -> bool:
        if types and event.type not in types:
            return False
        if args.no_heartbeats and event.type == "heartbeat":
            return False
        return args.since is None or event.time >= args.since

    return keep


def cmd_events(args: argparse.Namespace) -> int:
    if args.csv and args.follow:
        raise ConfigError("--csv writes a finished table: leave out --follow")
    settings = settings_from(args)
    with bus_target(settings) as target:
        return asyncio.run(_events(target, settings, args))


async def _events(target: BusTarget, settings: Settings, args: argparse.Namespace) -> int:
    out = Output(args)
    async with jetstream(target, settings, "trainbus-events") as nc:
        js = nc.jetstream()
        if await _replay(js, args, out) == 0:
            known = await _known_runs(js)
            hint = f" (runs: {', '.join(known[:10])})" if known else " (the stream holds no runs yet)"
            raise NotFound(f"no events for run {args.run!r}{hint}")
    out.finish()
    return 0


async def _replay(js: Any, args: argparse.Namespace, out: Output) -> int:
    """Feed the run's events to ``out``; how many the stream holds (0: no such run)."""
    count = 0
    try:
        # closed here, not when the loop ends: a reader that went away must not leave a subscription behind
        async with contextlib.aclosing(replay(js, run_events(args.run), follow=args.follow)) as items:
            async for item in items:
                count += 1
                out.take(item)
    except nats.js.errors.NotFoundError:
        return 0
    return count


class Output:
    """What ``trainbus events`` prints of each event: a table row, the stored JSON line, or a CSV row
    (written at the end); events the filters leave out and unreadable ones are skipped as asked."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.keep = event_filter(args)
        self.filtered = bool(args.types or args.since or args.no_heartbeats)
        self.csv, self.json, self.follow = args.csv, args.json, args.follow
        self.newer = NewerEvents()
        self.rows: list[dict[str, Any]] = []

    def take(self, item: Delivered) -> None:
        if item.newer is not None:
            self.newer.skip(item)
        elif item.event is None:
            if not self.filtered and not self.csv:
                print(f"{item.stream_seq:>6}  invalid event on {item.subject}: {item.error}", flush=self.follow)
        elif self.keep(item.event):
            self._write(item, item.event)

    def _write(self, item: Delivered, event: Event) -> None:
        if self.csv:
            self.rows.append({"stream_seq": item.stream_seq, **flat(event.model_dump(mode="json"))})
        elif self.json:
            print(item.data.decode(), flush=self.follow)
        else:
            print(event_row(item.stream_seq, event), flush=self.follow)

    def finish(self) -> None:
        if self.csv:
            write_csv(self.rows, ["stream_seq", "time", "type", "run_id", "attempt", "source", "seq", "step"])


async def _known_runs(js: Any) -> list[str]:
    try:
        return await run_ids(js)
    except nats.js.errors.NotFoundError:
        return []
