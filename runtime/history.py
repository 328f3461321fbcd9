"""Runs you can manage: `trainbus events`, `trainbus runs` (filters, CSV), `tag`, `note`, `runs rm`.

``events`` replays one run's events (``--type``, ``--since``, ``--no-heartbeats``, ``--csv`` for a
spreadsheet or pandas); ``runs`` lists every run with its latest state (``--state``, ``--name``
glob, ``--since``, ``--csv``). ``tag`` and ``note`` publish ``run.tag`` / ``run.note`` events into
the run's own stream; ``runs rm`` purges the run's subjects from the stream (JetStream
purge-by-subject) and its entries from the checkpoints bucket, and says what it removed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import fnmatch
import getpass
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from runtime.bus import BusTarget, bus_target, connected
from runtime.commands import add_settings_args, add_stall_after_arg, run_id_arg, settings_from
from runtime.errors import BusUnavailable, ConfigError, NotFound
from runtime.liveness import LIVE_STATES
from runtime.render import age, event_row, flat, table
from runtime.settings import Settings
from runtime.stream import NO_JETSTREAM, NewerEvents, count_stored, list_runs, replay, run_ids, run_summary
from schemas import EVENT_TYPES, EVENTS_STREAM, Event, RunNote, RunTag, event_subject, parse_event, run_events
from schemas.subjects import CHECKPOINTS_BUCKET

RUN_STATES = ("unknown", "running", "paused", "stopping", "stalled", "completed", "stopped", "failed")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RUN_COLUMNS = [
    "run_id", "state", "last_event", "attempt", "step", "loss", "learning_rate", "lr_peak", "max_grad_norm", "eval_accuracy",
]  # fmt: skip


def since_arg(value: str) -> datetime:
    """argparse ``type=``: ``30s``, ``10m``, ``2h``, ``1d`` ago, or an ISO time (UTC unless it says)."""
    number, unit = value[:-1], value[-1:]
    if unit in UNITS and number.replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(number) * UNITS[unit])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: use 30s, 10m, 2h, 1d or an ISO time like 2026-05-01T12:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def choices_arg(known: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """argparse ``type=`` for a comma-separated list of ``known`` values."""

    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in known]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or repr(value)}: unknown {what} (known: {', '.join(known)})"
            )
        return items

    return parse


def issuer() -> str:
    """Who is acting: the NATS user we connect as, else the OS user."""
    return os.environ.get("NATS_USER") or getpass.getuser()


@asynccontextmanager
async def jetstream(target: BusTarget, settings: Settings, name: str) -> AsyncIterator[NATS]:
    """A connection whose JetStream trouble (none on the server, no answer) is one line and exit 3."""
    async with connected(target, settings, name=name) as nc:
        try:
            yield nc
        except nats.js.errors.ServiceUnavailableError:
            raise BusUnavailable(NO_JETSTREAM) from None
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise BusUnavailable(
                f"no answer from JetStream at {target.display}: is JetStream enabled, and may this user do this?"
            ) from None


def write_csv(rows: list[dict[str, Any]], first: list[str]) -> None:
    """Rows as CSV on stdout: ``first`` columns, then every other key in the order first seen."""
    columns = list(first)
    for row in rows:
        columns += [key for key in row if key not in columns]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


# ---- events ------------------------------------------------------------------------------


def register_events(sub: Any) -> None:
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
    keep, filtered = event_filter(args), bool(args.types or args.since or args.no_heartbeats)
    rows: list[dict[str, Any]] = []
    async with jetstream(target, settings, "trainbus-events") as nc:
        js = nc.jetstream()
        newer = NewerEvents()
        count = 0
        try:
            async for item in replay(js, run_events(args.run), follow=args.follow):
                count += 1
                if item.newer is not None:
                    newer.skip(item)
                elif item.event is None:
                    if not filtered and not args.csv:
                        print(f"{item.stream_seq:>6}  invalid event on {item.subject}: {item.error}", flush=args.follow)
                elif not keep(item.event):
                    continue
                elif args.csv:
                    rows.append({"stream_seq": item.stream_seq, **flat(item.event.model_dump(mode="json"))})
                elif args.json:
                    print(item.data.decode(), flush=args.follow)
                else:
                    print(event_row(item.stream_seq, item.event), flush=args.follow)
        except nats.js.errors.NotFoundError:
            count = 0
        if count == 0:
            known = await _known_runs(js)
            hint = f" (runs: {', '.join(known[:10])})" if known else " (the stream holds no runs yet)"
            raise NotFound(f"no events for run {args.run!r}{hint}")
    if args.csv:
        write_csv(rows, ["stream_seq", "time", "type", "run_id", "attempt", "source", "seq", "step"])
    return 0


async def _known_runs(js: Any) -> list[str]:
    try:
        return await run_ids(js)
    except nats.js.errors.NotFoundError:
        return []


# ---- runs --------------------------------------------------------------------------------


def register_runs(sub: Any) -> None:
    p = sub.add_parser("runs", help="list runs with their latest state (`runs rm RUN` deletes one)")
    p.add_argument("--state", dest="states", action="append", type=choices_arg(RUN_STATES, "run state"),
                   metavar="STATE[,STATE]", help="only runs in these states, e.g. running,stalled")  # fmt: skip
    p.add_argument("--name", metavar="GLOB", help="only run ids matching GLOB, e.g. 'tiny-*'")
    p.add_argument(
        "--since", type=since_arg, metavar="WHEN", help="only runs with an event after WHEN: 10m, 2h, 1d, ISO"
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per run")
    out.add_argument("--csv", action="store_true", help="CSV, one row per run")
    add_stall_after_arg(p)
    add_settings_args(p)
    p.set_defaults(func=cmd_runs)
    inner = p.add_subparsers(dest="runs_command", metavar="rm", parser_class=type(p))
    rm = inner.add_parser("rm", help="delete a run's events from the stream and its checkpoint-bucket entries")
    rm.add_argument("run", type=run_id_arg, help="run id")
    rm.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    add_stall_after_arg(rm)
    add_settings_args(rm)
    rm.set_defaults(func=cmd_runs_rm)


def run_filter(args: argparse.Namespace) -> Callable[[dict[str, Any]], bool]:
    """Whether a run (a ``run_summary``) passes ``--state``, ``--name`` and ``--since``."""
    states = {s for group in args.states or [] for s in group}

    def keep(run: dict[str, Any]) -> bool:
        if states and run["state"] not in states:
            return False
        if args.name and not fnmatch.fnmatchcase(run["run_id"], args.name):
            return False
        last = run.get("last_event")
        return args.since is None or (last is not None and datetime.fromisoformat(last) >= args.since)

    return keep


def cmd_runs(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        runs = [run for run in asyncio.run(_runs(target, settings, args.stall_after)) if run_filter(args)(run)]
    if args.json:
        for run in runs:
            print(json.dumps(run, default=str))
        return 0
    for run in runs:
        hp = run.get("hyperparameters") or {}
        run["lr_peak"] = hp.get("learning_rate")
        run["max_grad_norm"] = hp.get("max_grad_norm")
        run["tags"] = ",".join(f"{k}={v}" for k, v in (run.get("tags") or {}).items())
    if args.csv:
        write_csv([flat(run) for run in runs], [*RUN_COLUMNS, "tags"])
    elif not runs:
        filtered = args.states or args.name or args.since
        print("no runs match" if filtered else "no runs yet: start one with `trainbus train configs/tiny.yaml`")
    else:
        for run in runs:
            run["last_event"] = age(run["age_seconds"]) if "age_seconds" in run else None
        print(table(runs, [*RUN_COLUMNS, *(["tags"] if any(run["tags"] for run in runs) else [])]))
    return 0


async def _runs(target: BusTarget, settings: Settings, stall_after: float) -> list[dict[str, Any]]:
    async with jetstream(target, settings, "trainbus-runs") as nc:
        try:
            return await list_runs(nc, stall_after=stall_after)
        except nats.js.errors.NotFoundError:
            return []


def cmd_runs_rm(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        removed, keys = asyncio.run(_remove(target, settings, args))
    print(
        f"removed run {args.run}: {removed} events from {EVENTS_STREAM} (subjects {run_events(args.run)}) and "
        f"{keys} entries from {CHECKPOINTS_BUCKET}; its checkpoint folders on disk are left as they are"
    )
    return 0


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(f"{question}: add --yes (there is no terminal to ask on)")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise ConfigError("nothing removed")


async def _remove(target: BusTarget, settings: Settings, args: argparse.Namespace) -> tuple[int, int]:
    async with jetstream(target, settings, "trainbus-runs-rm") as nc:
        js = nc.jetstream()
        try:
            stored = await count_stored(js, run_events(args.run))
        except nats.js.errors.NotFoundError:
            stored = 0
        if stored == 0:
            raise NotFound(f"no events for run {args.run!r}: nothing to remove")
        state = (await run_summary(js, args.run, stall_after=args.stall_after))["state"]
        if state in LIVE_STATES:
            raise ConfigError(f"run {args.run} is {state}: stop it first (trainbus ctl stop --run {args.run})")
        _confirm(f"remove the {stored} events of run {args.run} from {EVENTS_STREAM}?", args.yes)
        await js.purge_stream(EVENTS_STREAM, subject=run_events(args.run))
        return stored, await _purge_keys(js, args.run)


async def _purge_keys(js: Any, run_id: str) -> int:
    """Purge ``<run>.*`` from the checkpoints bucket (watchers, e.g. the predictor, see it go)."""
    try:
        kv = await js.key_value(CHECKPOINTS_BUCKET)
        keys = [key for key in await kv.keys() if key.startswith(f"{run_id}.")]  # keys(filters=) matches substrings
    except (nats.js.errors.NotFoundError, nats.js.errors.NoKeysError):
        return 0
    for key in keys:
        await kv.purge(key)
    return len(keys)


# ---- tag / note --------------------------------------------------------------------------


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
    print(f"tagged run {event.run_id}: " + " ".join(f"{k}={v}" for k, v in tags.items()))
    return 0


def cmd_note(args: argparse.Namespace) -> int:
    event = _publish_annotation(args, RunNote, text=args.text)
    print(f"noted on run {event.run_id} (event {event.event_id})")
    return 0


def _publish_annotation(args: argparse.Namespace, cls: type[RunTag | RunNote], **fields: Any) -> RunTag | RunNote:
    settings = settings_from(args)
    kind = cls.model_fields["type"].default
    try:
        event = cls(event_id=f"{args.run}.user.{kind.split('.')[1]}.{uuid.uuid4().hex[:12]}", run_id=args.run,
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
        await js.publish(
            event_subject(event.run_id, stamped.type),
            stamped.model_dump_json().encode(),
            headers={"Nats-Msg-Id": stamped.event_id},
        )
        return stamped
