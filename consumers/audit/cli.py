"""`trainbus audit` (the audit gate service) and `trainbus checkpoints` (checkpoints with their verdicts).

trainbus audit --rules configs/audit.yaml          # every run; `trainbus up` starts it
trainbus audit --partition 0/2                     # half of the runs (another gate takes 1/2)
trainbus checkpoints --run RUN --approved --json   # what may be promoted
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import nats.js.errors

from consumers.audit.loop import DURABLE, ensure_events_stream, run_audit
from consumers.audit.partitions import (
    PARTITIONED_STREAM,
    durable_name,
    ensure_partitions,
    parse_partition,
    partition_subject,
)
from consumers.audit.rules import AuditConfig, load_rules
from runtime.bus.connect import BusTarget, bus_target, connect, connected
from runtime.bus.stream import NewerEvents, count_stored, replay
from runtime.cli.args import add_settings_args, run_id_arg, settings_from
from runtime.cli.render import table, terminal_width
from runtime.errors import ConfigError, NotFound
from runtime.settings import Settings, packaged
from schemas import ALL_EVENTS, EVENTS_STREAM, AuditVerdict, Checkpoint, run_events
from schemas.subjects import CHECKPOINTS_BUCKET, event_subject

DEFAULT_RULES = "configs/audit.yaml"
"""Relative to the current folder, else the project's own copy (so `trainbus up` works anywhere)."""


def default_rules() -> str:
    """``configs/audit.yaml`` here if there is one, else the one shipped with trainbus."""
    return packaged(DEFAULT_RULES)


def register_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="the audit gate: flag problems, judge every checkpoint, pause runs")
    p.add_argument(
        "--rules", default=None, metavar="YAML", type=packaged, help=f"rules file (default: {DEFAULT_RULES})"
    )
    p.add_argument("--run", type=run_id_arg, help="audit only this run (its own durable consumer)")
    p.add_argument(
        "--partition",
        metavar="K/N",
        help="audit only the runs NATS puts in partition K of N (run N gates, 0/N to N-1/N, to scale out)",
    )
    p.add_argument(
        "--repartition",
        action="store_true",
        help="with --partition: split the runs N ways even if they were split otherwise",
    )
    add_settings_args(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.partition and args.run:
        raise ConfigError("--run and --partition: choose one (a run belongs to one partition)")
    partition = parse_partition(args.partition) if args.partition else None
    rules = args.rules or default_rules()
    config = load_rules(rules)
    with bus_target(settings) as target:
        return asyncio.run(_audit(target, settings, config, rules, args.run, partition, args.repartition))


async def _audit(
    target: BusTarget,
    settings: Settings,
    config: AuditConfig,
    rules_path: str,
    run: str | None,
    partition: tuple[int, int] | None = None,
    repartition: bool = False,
) -> int:
    subject = run_events(run) if run else ALL_EVENTS
    durable = f"{DURABLE}-{run}" if run else DURABLE
    stream = EVENTS_STREAM
    if partition is not None:
        subject, durable, stream = partition_subject(partition[0]), durable_name(*partition), PARTITIONED_STREAM
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    n = len(config.rules.enabled())

    what = f"partition {partition[0]} of {partition[1]} ({subject})" if partition else subject

    def ready() -> None:
        print(f"trainbus audit: watching {what} with {n} rules from {rules_path}", flush=True)

    nc = await connect(target, settings, name="trainbus-audit")
    try:
        if partition is not None:
            await ensure_events_stream(nc.jetstream(), settings)  # the partitions' source
            await ensure_partitions(nc.jetstream(), partition[1], settings.stream, repartition=repartition)
        audit, consumer = await run_audit(
            nc, config, settings, stop=stop, subject=subject, durable=durable, on_ready=ready, stream=stream
        )
    finally:
        await nc.close()  # everything published was acked: nothing to drain
    print(
        f"trainbus audit: stopped; {audit.replayed} events replayed, {consumer.handled} handled live, "
        f"{audit.invalid} invalid skipped; published {audit.flags} flags and {audit.verdicts} verdicts",
        flush=True,
    )
    return 0


def service() -> list[str]:
    """The command `trainbus up` and `trainbus demo` run for the audit gate."""
    return [sys.executable, "-m", "runtime.cli", "audit"]


# ---- checkpoints -------------------------------------------------------------------------


def register_checkpoints(sub: Any) -> None:
    p = sub.add_parser("checkpoints", help="a run's checkpoints with their audit verdicts")
    p.add_argument("--run", required=True, type=run_id_arg, help="run id")
    p.add_argument("--approved", action="store_true", help="only checkpoints the audit gate approved")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    add_settings_args(p)
    p.set_defaults(func=cmd_checkpoints)


async def checkpoint_rows(target: BusTarget, settings: Settings, run_id: str) -> list[dict[str, Any]]:
    """Every checkpoint event of ``run_id`` in stream order, joined with its verdict (if any)."""
    async with connected(target, settings, name="trainbus-checkpoints") as nc:
        js = nc.jetstream()
        try:
            if await count_stored(js, run_events(run_id)) == 0:
                raise NotFound(f"no events for run {run_id!r}")
        except nats.js.errors.NotFoundError:
            raise NotFound("the event stream does not exist yet: nothing has been published") from None
        verdicts: dict[str, AuditVerdict] = {}
        newer = NewerEvents()  # says once that a newer trainbus wrote events this one skips
        async for item in replay(js, event_subject(run_id, "audit.verdict")):
            if item.newer is not None:
                newer.skip(item)
            elif isinstance(item.event, AuditVerdict):
                verdicts.setdefault(item.event.checkpoint_event_id, item.event)
        rows = []
        async for item in replay(js, event_subject(run_id, "checkpoint")):
            if item.newer is not None:
                newer.skip(item)
            elif isinstance(item.event, Checkpoint):
                rows.append(_row(item.event, verdicts.get(item.event.event_id)))
        best = await _best_key(js, run_id)
    for row in rows:
        row["best"] = best is not None and row["verdict_event_id"] == best
    return rows


def _row(ckpt: Checkpoint, verdict: AuditVerdict | None) -> dict[str, Any]:
    return {
        "run_id": ckpt.run_id,
        "attempt": ckpt.attempt,
        "step": ckpt.step,
        "trigger": ckpt.trigger,
        "path": ckpt.path,
        "sha256": ckpt.sha256,
        "checkpoint_event_id": ckpt.event_id,
        "verdict": verdict.verdict if verdict is not None else "pending",
        "reasons": list(verdict.reasons) if verdict is not None else [],
        "metrics": dict(verdict.metrics) if verdict is not None else {},
        "verdict_event_id": verdict.event_id if verdict is not None else None,
    }


async def _best_key(js: Any, run_id: str) -> str | None:
    """The verdict id the bucket's ``<run>.best`` pointer names, if the bucket has one."""
    try:
        kv = await js.key_value(CHECKPOINTS_BUCKET)
        entry = await kv.get(f"{run_id}.best")
    except nats.js.errors.NotFoundError:
        return None
    value = json.loads(entry.value or b"{}")
    return value.get("verdict_event_id")


def cmd_checkpoints(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        rows = asyncio.run(checkpoint_rows(target, settings, args.run))
    if args.approved:
        rows = [r for r in rows if r["verdict"] == "approved"]
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    if not rows:
        print(f"no {'approved ' if args.approved else ''}checkpoints for run {args.run}")
        return 0
    for row in rows:
        row["best"] = "*" if row["best"] else ""
        row["accuracy"] = row["metrics"].get("accuracy")
        row["why"] = "; ".join(row["reasons"])
    columns = ["step", "attempt", "trigger", "verdict", "best", "accuracy", "path", "why"]
    print(table(rows, columns, width=terminal_width()))  # the reasons wrap on a terminal, whole in a pipe
    return 0
