"""`trainbus queue`: the launch queue's jobs and the live agents; `trainbus cancel JOB`.

    trainbus queue               # waiting and running jobs, with their position; then the agents
    trainbus queue --all --json  # every job the bucket holds, one JSON object per line
    trainbus cancel j-3f2a9c1d0e [--no-save] [--wait]

A waiting job leaves the queue at once; a running one is stopped by its agent (a checkpoint first
unless ``--no-save``), and ``--wait`` waits until it has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import nats.js.errors

from runtime.bus.connect import BusTarget, bus_target
from runtime.bus.stream import jetstream
from runtime.cli.args import add_settings_args, settings_from
from runtime.cli.render import age, table
from runtime.errors import ConfigError
from runtime.launch.jobs import Conflict, JobStore
from runtime.launch.queue import agents_bucket, cancel, waiting_order
from runtime.settings import Settings
from schemas.jobs import AgentStatus, JobRecord

JOB_COLUMNS = ["job", "state", "run", "priority", "slots", "position", "agent", "updated", "reason"]
AGENT_COLUMNS = ["agent", "host", "slots", "free", "jobs", "labels", "heartbeat", "draining"]
WAIT_POLL_SECONDS = 1.0


def register_queue(sub: Any) -> None:
    p = sub.add_parser("queue", help="the launch queue: waiting and running jobs, and the live agents")
    p.add_argument("--all", action="store_true", help="finished jobs too")
    p.add_argument("--json", action="store_true", help="one JSON object per job and per agent")
    add_settings_args(p)
    p.set_defaults(func=cmd_queue)


def register_cancel(sub: Any) -> None:
    p = sub.add_parser("cancel", help="remove a waiting job from the queue, or stop a running one")
    p.add_argument("job", help="job id (trainbus queue lists them)")
    p.add_argument("--no-save", action="store_true", help="a running job stops without saving a checkpoint first")
    p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    p.add_argument("--timeout", type=float, default=300.0, help="with --wait: seconds (default 300)")
    add_settings_args(p)
    p.set_defaults(func=cmd_cancel)


# ---- queue --------------------------------------------------------------------------------


def positions(records: list[JobRecord]) -> dict[str, int]:
    """Each waiting job's place in the queue, from 1: priority first, then submission order."""
    return {r.spec.job_id: i for i, r in enumerate(waiting_order(records), start=1)}


def job_rows(records: list[JobRecord], now: datetime, *, everything: bool) -> list[dict[str, Any]]:
    """The jobs as table rows: running first, then waiting in queue order, then (``everything``) the rest."""
    place = positions(records)
    shown = [r for r in records if everything or not r.final]
    shown.sort(key=lambda r: (r.state not in ("starting", "running"), place.get(r.spec.job_id, 1 << 30), r.updated_at))
    return [_job_row(r, place.get(r.spec.job_id), now) for r in shown]


def _job_row(r: JobRecord, position: int | None, now: datetime) -> dict[str, Any]:
    return dict(
        job=r.spec.job_id, state=r.state, run=r.spec.run_id, priority=r.spec.priority, slots=r.spec.slots,
        position=position, agent=r.agent, updated=age((now - r.updated_at).total_seconds()), reason=r.reason,
    )  # fmt: skip


def agent_rows(agents: list[AgentStatus], now: datetime) -> list[dict[str, Any]]:
    return [_agent_row(a, now) for a in sorted(agents, key=lambda a: a.agent_id)]


def _agent_row(a: AgentStatus, now: datetime) -> dict[str, Any]:
    labels = ",".join(f"{k}={v}" for k, v in a.labels.items())
    return dict(
        agent=a.agent_id, host=a.host, slots=a.slots, free=a.free, jobs=",".join(a.jobs), labels=labels,
        heartbeat=age(a.age(now)), draining="yes" if a.draining else "",
    )  # fmt: skip


def cmd_queue(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        records, agents = asyncio.run(_read(target, settings))
    now = datetime.now(UTC)
    if args.json:
        for record in records:
            print(json.dumps({"kind": "job", **record.model_dump(mode="json")}))
        for agent in agents:
            print(json.dumps({"kind": "agent", **agent.model_dump(mode="json")}))
        return 0
    jobs = job_rows(records, now, everything=args.all)
    print(table(jobs, JOB_COLUMNS) if jobs else "no jobs waiting or running (`trainbus submit CONFIG` queues one)")
    print()
    print(table(agent_rows(agents, now), AGENT_COLUMNS) if agents else "no agents (`trainbus agent` starts one)")
    return 0


async def _read(target: BusTarget, settings: Settings) -> tuple[list[JobRecord], list[AgentStatus]]:
    async with jetstream(target, settings, "trainbus-queue") as nc:
        js = nc.jetstream()
        try:
            records = await (await JobStore.open(js)).all()
        except nats.js.errors.BucketNotFoundError:
            return [], []
        return records, await live_agents(js)


async def live_agents(js: Any) -> list[AgentStatus]:
    """Every agent whose heartbeat has not expired."""
    try:
        kv = await agents_bucket(js)
    except nats.js.errors.BucketNotFoundError:  # no agent has run on this bus yet
        return []
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    found = []
    for key in keys:
        try:
            entry = await kv.get(key)
            found.append(AgentStatus.model_validate_json(entry.value or b""))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, ValueError):
            continue
    return found


# ---- cancel -------------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        record = asyncio.run(_cancel(target, settings, args))
    print(_said(record))
    return 0


async def _cancel(target: BusTarget, settings: Settings, args: argparse.Namespace) -> JobRecord:
    async with jetstream(target, settings, "trainbus-cancel") as nc:
        js = nc.jetstream()
        try:
            record = await cancel(js, args.job, save=not args.no_save)
        except nats.js.errors.BucketNotFoundError:
            raise ConfigError(f"no job {args.job!r}: this bus has no launch queue yet") from None
        except Conflict as exc:
            raise ConfigError(str(exc)) from None
        if args.wait and not record.final:
            record = await _until_final(await JobStore.open(js), args.job, args.timeout)
        return record


async def _until_final(store: JobStore, job_id: str, timeout: float) -> JobRecord:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        record = (await store.get(job_id)).record
        if record.final:
            return record
        await asyncio.sleep(WAIT_POLL_SECONDS)
    raise ConfigError(f"job {job_id} has not stopped within {timeout:g}s (`trainbus queue` shows it)")


def _said(record: JobRecord) -> str:
    job = record.spec.job_id
    if record.state == "cancelled":
        return f"cancelled job {job} (run {record.spec.run_id}): {record.reason}"
    how = "saving a checkpoint first" if record.cancel == "save" else "without saving"
    return f"asked agent {record.agent} to stop job {job} (run {record.spec.run_id}), {how}"
