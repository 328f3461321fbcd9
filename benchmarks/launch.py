"""`trainbus bench launch`: what starting a run through the launch queue costs, how many jobs an
agent dispatches, and how fast a run goes on after its agent's host is lost.

Run from the repository root::

    trainbus bench launch                          # the three parts on configs/tiny.yaml
    trainbus bench launch --only start --repeat 5
    trainbus bench launch --only dispatch --jobs 40 --slots 4

Everything runs on this machine, on an embedded nats-server of the bench's own; each agent works
in a folder of its own, as on a machine of its own (``benchmarks.launch_lab``). Measured in this
one run:

1. **start**: `trainbus submit` → the run's first ``train.step`` with one idle agent of one slot,
   set against `trainbus train` started by hand on the same config, alternately ``--repeat``
   times; the queued path split into `trainbus submit` (it checks the config, then queues),
   the agent taking the job (``job.state`` starting), ``run.started`` and the first step.
2. **dispatch**: ``--jobs`` trivial jobs queued at once for one agent of ``--slots`` slots. A
   trivial job is one whose trainer refuses its config at once (an unknown key, exit 2): no model
   loads, so a job costs what the agent adds (claim, start a `trainbus train` process, see it
   end, record the end) plus that process's Python start and config check, which dominate.
   Figures: jobs per second, each job's time from starting to failed, and the ratio of the
   throughput to what the slots would do with no gap between jobs (slots / that time).
3. **failover**: two agents of one slot; a run saving a checkpoint every ``--save-steps``; at
   ``--kill-at`` steps the agent running it and every process it started are SIGKILLed (a lost
   host). Figures: kill → job requeued (the lease, ``LEASE_SECONDS``, must lapse first) → started
   on the other agent → ``run.started`` of attempt 2 → its first step, the steps redone (the step
   reached minus the checkpoint resumed from), and events lost or stored twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.failover import lost_and_twice, stored
from benchmarks.launch_lab import Arrivals, Lab
from consumers.control_client import build_command, send_command
from producers.task.sampledata import write_sample_data
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.errors import ConfigError, TrainbusError
from runtime.launch.jobs import JobStore
from runtime.launch.queue import LEASE_SECONDS, enqueue, ensure_queue, new_job_id
from runtime.logs import setup_logging
from runtime.settings import ServerSettings, Settings, load_config, packaged
from schemas import Event, JobState
from schemas.jobs import JobSpec

PARTS = ("start", "dispatch", "failover")
QUICK = ["training.max_steps=5", "training.logging_steps=1", "training.eval_steps=null", "training.save_steps=null"]
"""A run that starts, takes five steps and ends: what the start part measures up to its first step."""
REFUSED = "training.max_stepz=1"
"""An unknown key: the trainer refuses the config at once (exit 2)."""


def register(sub: Any) -> None:
    """Add ``launch`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("launch", help="submit → first step vs train by hand, dispatch throughput, agent loss → resumed")
    p.add_argument("--config", default="configs/tiny.yaml", type=packaged, metavar="YAML", help="run config (default: %(default)s)")  # fmt: skip
    p.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable; default: all)")
    p.add_argument("--repeat", type=int, default=3, help="start: runs of each kind, alternated (default 3)")
    p.add_argument("--jobs", type=int, default=20, help="dispatch: trivial jobs queued at once (default 20)")
    p.add_argument("--slots", type=int, default=2, help="dispatch: the agent's slots (default 2)")
    p.add_argument("--save-steps", type=int, default=20, help="failover: steps between checkpoints (default 20)")
    p.add_argument("--kill-at", type=int, default=30, help="failover: lose the host once this step arrived (default 30)")  # fmt: skip
    p.set_defaults(func=bench_launch)


def bench_launch(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise ConfigError(f"--config: {args.config} is not a file")
    if min(args.repeat, args.jobs, args.slots, args.save_steps) < 1 or args.kill_at <= args.save_steps:
        raise ConfigError("--repeat, --jobs, --slots and --save-steps are at least 1; --kill-at is above --save-steps")
    settings = load_config(Settings)
    setup_logging(settings.log.level, settings.log.format)
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-launch-") as tmp:
        work = Path(tmp)
        write_sample_data(work / "data")
        lab = Lab(start_server(ServerSettings(), work / "nats", lock=False), work, args.config,
                  os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))  # fmt: skip
        try:
            asyncio.run(_bench(lab, settings, args))
        finally:
            lab.close()
    return 0


async def _bench(lab: Lab, settings: Settings, args: argparse.Namespace) -> None:
    nc = await connect(BusTarget([lab.server.url], "bench"), settings, name="bench-launch")
    try:
        await ensure_queue(nc.jetstream(), settings.stream)
        arrivals = Arrivals()
        await arrivals.follow(nc)
        parts = args.only or list(PARTS)
        print(f"launch: {args.config} on {os.cpu_count()} cores, OMP_NUM_THREADS={lab.threads}; "
              f"an embedded nats-server; every agent in a folder of its own", flush=True)  # fmt: skip
        if "start" in parts:
            report_start(await start_part(lab, arrivals, args.repeat))
        if "dispatch" in parts:
            report_dispatch(await dispatch_part(lab, nc, arrivals, args.jobs, args.slots), args.jobs, args.slots)
        if "failover" in parts:
            report_failover(await failover_part(lab, nc, arrivals, args), args)
    finally:
        await nc.close()


# ---- 1. start ---------------------------------------------------------------------------------


@dataclass
class Start:
    """One queued start: seconds from the `trainbus submit` command to each milestone."""

    submitted: float
    taken: float
    started: float
    first_step: float


async def start_part(lab: Lab, arrivals: Arrivals, repeat: int) -> tuple[list[float], list[Start]]:
    lab.agent("idle", 1)
    by_hand: list[float] = []
    queued: list[Start] = []
    try:
        for i in range(repeat):
            first = i % 2 == 0  # alternate which goes first: a warm page cache helps whichever is second
            for kind in ("hand", "queued") if first else ("queued", "hand"):
                if kind == "hand":
                    by_hand.append(await _by_hand(lab, arrivals, f"hand-{i}"))
                else:
                    queued.append(await _queued(lab, arrivals, f"queued-{i}"))
    finally:
        lab.stop_agent("idle")
    return by_hand, queued


async def _by_hand(lab: Lab, arrivals: Arrivals, run_id: str) -> float:
    argv = [sys.executable, "-m", "runtime.cli", "train", lab.config, "--run-id", run_id]
    for item in [*lab.data(), f"training.output_dir={lab.work / 'by-hand'}", *QUICK]:
        argv += ["--set", item]
    began = time.monotonic()
    proc = subprocess.Popen(argv, env=lab.env, stdout=subprocess.DEVNULL, stderr=(lab.work / f"{run_id}.log").open("w"))
    first = await arrivals.wait(run_id, "train.step") - began
    await asyncio.to_thread(proc.wait, 300)
    return first


async def _queued(lab: Lab, arrivals: Arrivals, run_id: str) -> Start:
    argv = [sys.executable, "-m", "runtime.cli", "submit", lab.config, "--run-id", run_id]
    for item in [*lab.data(), *QUICK]:
        argv += ["--set", item]
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, env=lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    submitted = time.monotonic()
    if proc.returncode != 0:
        raise TrainbusError(f"trainbus submit failed: {err.decode().strip()[-300:]}")
    taken, started, first = [await arrivals.wait(run_id, k) for k in ("job.starting", "run.started", "train.step")]
    await arrivals.wait(run_id, "job.completed")  # the agent is idle again
    return Start(submitted - began, taken - began, started - began, first - began)


def report_start(measured: tuple[list[float], list[Start]]) -> None:
    by_hand, queued = measured
    hand = statistics.median(by_hand)
    med = {k: statistics.median(getattr(s, k) for s in queued) for k in ("submitted", "taken", "started", "first_step")}
    print(f"start: command → the run's first train.step, median of {len(by_hand)} each (an idle agent of one slot)")
    print(f"  trainbus train, by hand                {hand:7.2f} s")
    print(f"  trainbus submit → an idle agent        {med['first_step']:7.2f} s   (queued/by hand {med['first_step'] / hand:.2f})")  # fmt: skip
    print(f"    trainbus submit exits (config checked, job queued)   {med['submitted']:7.2f} s")
    print(f"    the agent takes the job (job.state starting)         {med['taken']:7.2f} s")
    print(f"    run.started                                          {med['started']:7.2f} s")
    print(f"  every run: by hand {_list(by_hand)}; queued {_list([s.first_step for s in queued])}", flush=True)


# ---- 2. dispatch ------------------------------------------------------------------------------


async def dispatch_part(lab: Lab, nc: Any, arrivals: Arrivals, jobs: int, slots: int) -> dict[str, Any]:
    lab.agent("dispatch", slots)
    js = nc.jetstream()
    text = Path(lab.config).read_text()
    run_ids = [f"trivial-{i}" for i in range(jobs)]
    try:
        began = time.monotonic()
        for run_id in run_ids:
            spec = JobSpec(job_id=new_job_id(), run_id=run_id, config_name=lab.config, config_yaml=text,
                           overrides=[*lab.data(), REFUSED], submitted_by="bench-launch")  # fmt: skip
            await enqueue(js, spec)
        queued = time.monotonic() - began
        ended = [await arrivals.wait(r, "job.failed", timeout=60 + 30 * jobs) for r in run_ids]
    finally:
        lab.stop_agent("dispatch")
    lifetimes = [_between(arrivals, r, "job.starting", "job.failed") for r in run_ids]
    waits = [_between(arrivals, r, "job.queued", "job.starting") for r in run_ids[:slots]]
    return {"wall": max(ended) - began, "queued": queued, "lifetimes": lifetimes, "first_waits": waits}


def _between(arrivals: Arrivals, run_id: str, first: str, then: str) -> float:
    return (arrivals.at(run_id, then) or 0.0) - (arrivals.at(run_id, first) or 0.0)


def report_dispatch(f: dict[str, Any], jobs: int, slots: int) -> None:
    rate = jobs / f["wall"]
    life = statistics.median(f["lifetimes"])
    ideal = slots / life
    print(f"dispatch: {jobs} trivial jobs (each trainer refuses its config at once: `--set {REFUSED}`, exit 2), "
          f"one agent of {slots} slots")  # fmt: skip
    print(f"  queued (runtime.launch.queue.enqueue)     {f['queued']:7.2f} s for all {jobs}")
    print(f"  all {jobs} failed after                  {f['wall']:7.2f} s   {rate:.2f} jobs/s")
    print(f"  a job, starting → failed (median)      {life:7.2f} s   (a `trainbus train` process refusing its config)")
    print(f"  throughput / slots÷that time           {rate / ideal:7.2f}     (1.00: no gap between a job and the next on a slot)")  # fmt: skip
    print(f"  queued → taken, the first {slots} (free slots) {_list(f['first_waits'])}", flush=True)


# ---- 3. failover ------------------------------------------------------------------------------


async def failover_part(lab: Lab, nc: Any, arrivals: Arrivals, args: argparse.Namespace) -> dict[str, Any]:
    run_id = "failover"
    for name in ("a", "b"):
        lab.agent(name, 1)
    steps = args.kill_at + 4 * args.save_steps  # far enough that the run is still going when it is resumed
    spec = JobSpec(job_id=new_job_id(), run_id=run_id, config_name=lab.config, config_yaml=Path(lab.config).read_text(),
                   overrides=[*lab.data(), f"training.max_steps={steps}", f"training.save_steps={args.save_steps}",
                              "training.logging_steps=1", "training.eval_steps=null"], submitted_by="bench-launch")  # fmt: skip
    await enqueue(nc.jetstream(), spec)
    await arrivals.wait(run_id, "job.running")
    while arrivals.step.get((run_id, 1), 0) < args.kill_at:
        await asyncio.sleep(0.02)
    holder = await _holder(lab, nc, spec.job_id)
    reached = arrivals.step[(run_id, 1)]
    killed = time.monotonic()
    lab.lose_host(holder)
    marks = {k: await arrivals.wait(run_id, k, attempt=2, after=killed, timeout=LEASE_SECONDS + 300) - killed
             for k in ("job.requeued", "job.starting", "run.started", "train.step")}  # fmt: skip
    command = build_command("stop", run_id, issued_by="bench-launch", reason="measured", save=False)
    await send_command(nc, command)
    await arrivals.wait(run_id, "run.finished", attempt=2)
    lost, twice = _lost_and_twice([e for e, _ in await stored(nc, run_id)])
    for name in list(lab.agents):
        lab.stop_agent(name)
    return {"holder": holder, "reached": reached, "resumed": arrivals.resumed_from.get(run_id), "marks": marks,
            "lost": lost, "twice": twice}  # fmt: skip


def _lost_and_twice(events: list[Event]) -> tuple[int, int]:
    """``lost_and_twice`` of the trainers' events (numbered per attempt), plus the gaps in the job's
    ``job.state`` events, which are numbered per job across its attempts."""
    jobs = sorted(e.seq for e in events if isinstance(e, JobState))
    lost, twice = lost_and_twice([e for e in events if not isinstance(e, JobState)])
    return lost + (jobs[-1] - len(set(jobs)) if jobs else 0), twice + len(jobs) - len(set(jobs))


async def _holder(lab: Lab, nc: Any, job_id: str) -> str:
    record = (await (await JobStore.open(nc.jetstream())).get(job_id)).record
    if record.agent not in lab.agents:
        raise TrainbusError(f"job {job_id} is on {record.agent!r}, not one of the bench's agents")
    return record.agent or ""


def report_failover(f: dict[str, Any], args: argparse.Namespace) -> None:
    m = f["marks"]
    resumed = f["resumed"]
    redone = f["reached"] - (resumed or 0)
    print(f"failover: two agents of one slot; checkpoints every {args.save_steps} steps; the host of {f['holder']} "
          f"lost (agent and trainer SIGKILLed) at step {f['reached']}")  # fmt: skip
    print(
        f"  kill → the other agent takes the job   {m['job.requeued']:7.2f} s   (once the lease, {LEASE_SECONDS:g} s, lapsed)"
    )
    print(f"  kill → it starts the trainer           {m['job.starting']:7.2f} s")
    print(f"  kill → run.started, attempt 2          {m['run.started']:7.2f} s   (resumed from step {resumed})")
    print(f"  kill → attempt 2's first train.step    {m['train.step']:7.2f} s   "
          f"(after the lease: {m['train.step'] - m['job.requeued']:.2f} s)")  # fmt: skip
    print(
        f"  steps redone                           {redone:7d}     (the last step that reached the bus minus the checkpoint)"
    )
    print(f"  events lost / stored twice             {f['lost']} / {f['twice']}", flush=True)


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"
