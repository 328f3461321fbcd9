"""`trainbus runs`: every run with its latest state; `trainbus runs rm RUN` deletes one from the bus.

``runs`` filters by ``--state``, ``--name`` glob and ``--since``, and prints a table, ``--json`` or
``--csv``. ``runs rm`` purges the run's subjects from the stream (JetStream purge-by-subject) and
its entries from the checkpoints bucket, and says what it removed.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import nats.js.errors

from runtime.bus.connect import BusTarget, bus_target
from runtime.bus.stream import count_stored, jetstream, list_runs, run_summary
from runtime.cli.args import add_settings_args, add_stall_after_arg, choices_arg, run_id_arg, settings_from, since_arg
from runtime.cli.render import age, flat, table, write_csv
from runtime.errors import ConfigError, NotFound
from runtime.groups import group_table, group_value
from runtime.lifecycle import LIVE_STATES, RUN_STATES
from runtime.settings import Settings
from schemas import EVENTS_STREAM, run_events
from schemas.subjects import CHECKPOINTS_BUCKET

RUN_COLUMNS = [
    "run_id", "state", "last_event", "attempt", "step", "loss", "learning_rate", "lr_peak", "max_grad_norm", "eval_accuracy",
]  # fmt: skip
LINEAGE_COLUMNS = ["parent", "group"]
"""Shown when any listed run is a fork (``parent``: RUN@STEP) or one of a ``--seeds`` group."""

RUNS_DESCRIPTION = (
    "Every run on the bus with its state, step and attempt, as the dashboard and /metrics show them. "
    "LAST_EVENT is how long ago the run's trainer last published (its current attempt: "
    "steps, heartbeats, command results); tags, notes, audit verdicts and predictor loads do not count. "
    "A running, paused or stopping run whose trainer has been silent for --stall-after is stalled. "
    "LEARNING_RATE is the rate of the last logged step; LR_PEAK and the other hyper-parameters are "
    "the live values, an applied `ctl set` included."
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "runs", help="list runs with their latest state (`runs rm RUN` deletes one)", description=RUNS_DESCRIPTION
    )
    p.add_argument("--state", dest="states", action="append", type=choices_arg(RUN_STATES, "run state"),
                   metavar="STATE[,STATE]", help="only runs in these states, e.g. running,stalled")  # fmt: skip
    p.add_argument("--name", metavar="GLOB", help="only run ids matching GLOB, e.g. 'tiny-*'")
    p.add_argument(
        "--since", type=since_arg, metavar="WHEN", help="only runs whose trainer published after WHEN: 10m, 2h, 1d, ISO"
    )
    p.add_argument("--group-by", metavar="KEY", help="one row per group and metric (n, mean, std, min, max): "
                   "a config key like adapter.r, tag:NAME, or sweep")  # fmt: skip
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
        found = asyncio.run(_runs(target, settings, args.stall_after, config=bool(args.group_by)))
    runs = [run for run in found if run_filter(args)(run)]
    if args.group_by:
        return _groups(runs, args)
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
        write_csv([flat(run) for run in runs], [*RUN_COLUMNS, *LINEAGE_COLUMNS, "tags"])
    elif not runs:
        filtered = args.states or args.name or args.since
        print("no runs match" if filtered else "no runs yet: start one with `trainbus train configs/tiny.yaml`")
    else:
        for run in runs:
            run["last_event"] = age(run["age_seconds"]) if "age_seconds" in run else None
        lineage = [c for c in LINEAGE_COLUMNS if any(run.get(c) for run in runs)]
        print(table(runs, [*RUN_COLUMNS, *lineage, *(["tags"] if any(run["tags"] for run in runs) else [])]))
    return 0


def group_rows(runs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The group table of ``runs`` (``runtime.groups``): the runs with no value for ``key`` join no group."""
    members: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        value = group_value(key, run.get("config") or {}, run.get("tags") or {}, run.get("sweep"), run.get("group"))
        if value is not None:
            members.setdefault(value, {})[run["run_id"]] = run
    return [{key: row.pop("group"), **row} for row in group_table(members)]


def _groups(runs: list[dict[str, Any]], args: argparse.Namespace) -> int:
    rows = group_rows(runs, args.group_by)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.csv:
        write_csv(rows, [args.group_by, "metric", "runs", "n", "mean", "std", "min", "max"])
    elif not rows:
        print(f"no run has a value for {args.group_by} (a config key like adapter.r, tag:NAME, or sweep)")
    else:
        print(table(rows, [args.group_by, "metric", "runs", "n", "mean", "std", "min", "max"]))
    return 0


async def _runs(
    target: BusTarget, settings: Settings, stall_after: float, *, config: bool = False
) -> list[dict[str, Any]]:
    async with jetstream(target, settings, "trainbus-runs") as nc:
        try:
            return await list_runs(nc, stall_after=stall_after, config=config)
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
