"""`trainbus bench failover`: SIGKILL the stream leader of a local 3-node cluster in the middle of a run.

Run from the repository root::

    trainbus bench failover                 # configs/tiny.yaml, 300 steps, the leader killed at step 100
    trainbus bench failover --steps 600 --kill-at 200

It starts a 3-node JetStream cluster on loopback (``runtime.bus.cluster``, R3 stream and bucket), the
audit gate, and a ``trainbus train`` subprocess publishing a ``train.step`` every step. At
``--kill-at`` it SIGKILLs the node leading the events stream, then sends a harmless command
(``set logging_steps=1``, the value the run has) until one is answered, and restarts the node after
``--down`` seconds. Figures, measured in this one run:

- step rate before the kill and in the ``--window`` seconds after it (and their ratio),
- publish stall: the longest an event waited between its creation and its storage after the kill,
- events lost (gaps in the trainer's ``seq``) and stored twice (repeated ``event_id``): must be 0,
- time from the kill to a new stream leader, to the first command answered, and until the
  restarted node is current again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from benchmarks.common import log_tail
from consumers.control_client import build_command, send_command
from runtime.bus.cluster import LocalCluster, start_cluster
from runtime.bus.connect import BusTarget, connect
from runtime.bus.stream import count_stored, decode, ensure_stream, replay
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import setup_logging
from runtime.settings import Settings, StreamSettings, load_config, packaged
from schemas import EVENTS_STREAM, Event, TrainStep, run_events

ISSUER = "bench-failover"


def register(sub: Any) -> None:
    """Add ``failover`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("failover", help="kill the stream leader of a 3-node cluster mid-run: stall, loss, commands")
    p.add_argument(
        "--config", default="configs/tiny.yaml", metavar="YAML", type=packaged, help="run config (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=300, help="steps of the run")
    p.add_argument("--kill-at", type=int, default=100, help="kill the leader once this step is stored")
    p.add_argument("--down", type=float, default=10.0, help="seconds the killed node stays down")
    p.add_argument("--window", type=float, default=10.0, help="seconds after the kill the step rate is measured over")
    p.set_defaults(func=bench_failover)


def trainer_argv(config: str, run_id: str, work: Path, *overrides: str) -> list[str]:
    """`trainbus train CONFIG` with its data and output under ``work`` (shared by the soak bench)."""
    data = work / "data"
    base = [
        f"training.output_dir={work / 'runs'}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.validation_file={data / 'validation.jsonl'}",
        f"data.test_file={data / 'test.jsonl'}",
    ]
    argv = [sys.executable, "-m", "runtime.cli", "train", config, "--run-id", run_id]
    for item in [*base, *overrides]:
        argv += ["--set", item]
    return argv


def lost_and_twice(events: list[Event]) -> tuple[int, int]:
    """Events missing from each (source, attempt)'s ``seq`` run, and events stored more than once."""
    seqs: dict[tuple[str, int], list[int]] = {}
    for e in events:
        seqs.setdefault((e.source, e.attempt), []).append(e.seq)
    lost = sum(max(s) - len(set(s)) for s in seqs.values())
    return lost, len(events) - len({e.event_id for e in events})


async def stored(nc: NATS, run_id: str) -> list[tuple[Event, float]]:
    """Every event of ``run_id`` with the time the stream stored it (its message timestamp)."""
    js = nc.jetstream()
    total = await count_stored(js, run_events(run_id))
    out: list[tuple[Event, float]] = []
    sub = await js.subscribe(run_events(run_id), stream=EVENTS_STREAM, ordered_consumer=True)
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            item = decode(msg, msg.metadata.sequence.stream)
            if item.event is not None:
                out.append((item.event, msg.metadata.timestamp.timestamp()))
    finally:
        await sub.unsubscribe()
    return out


async def _leader(nc: NATS, timeout: float = 5.0) -> str:
    info = await nc.jetstream(timeout=timeout).stream_info(EVENTS_STREAM)
    if info.cluster is None or not info.cluster.leader:
        raise TrainbusError("the events stream has no leader")
    return info.cluster.leader


async def _first_answer(nc: NATS, run_id: str) -> float:
    """Seconds until a command sent now (and again after every miss) gets the trainer's answer."""
    start = time.monotonic()
    while True:
        try:
            await send_command(
                nc, build_command("set", run_id, issued_by=ISSUER, settings=["logging_steps=1"]), timeout=1.0
            )
            return time.monotonic() - start
        except (TrainbusError, nats.errors.Error):
            await asyncio.sleep(0.05)


async def _elected(nc: NATS, old: str) -> float:
    """Seconds until the events stream has a leader other than ``old``."""
    start = time.monotonic()
    while True:
        try:
            if await _leader(nc, timeout=0.25) != old:  # short: a request that waits would hide when it happened
                return time.monotonic() - start
        except (TrainbusError, nats.errors.Error, TimeoutError):
            pass
        await asyncio.sleep(0.05)


async def _caught_up(nc: NATS, node: str) -> None:
    while True:
        try:
            info = await nc.jetstream(timeout=2).stream_info(EVENTS_STREAM)
            peers = {p.name: p for p in (info.cluster.replicas or [])} if info.cluster else {}
            if info.cluster and (
                info.cluster.leader == node or (node in peers and peers[node].current and not peers[node].offline)
            ):
                return
        except (nats.errors.Error, TimeoutError):
            pass
        await asyncio.sleep(0.2)


async def measure(
    cluster: LocalCluster,
    settings: Settings,
    run_id: str,
    trainer: subprocess.Popen[bytes],
    log: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    nc = await connect(BusTarget(cluster.url.split(","), "bench"), settings, name="bench-failover")
    try:
        js = nc.jetstream(timeout=5)
        while True:  # until the kill step is stored
            if trainer.poll() is not None:
                raise TrainbusError(f"the trainer exited with {trainer.returncode}: {log_tail(log)}")
            latest = [d.event async for d in replay(js, f"trainbus.events.{run_id}.train.step")]
            if latest and isinstance(latest[-1], TrainStep) and latest[-1].step >= args.kill_at:
                break
            await asyncio.sleep(0.5)
        leader = await _leader(nc)
        node = next(n for n in cluster.nodes if n.name == leader)
        assert node.server is not None
        killed_at = time.time()
        os.kill(node.server.pid, signal.SIGKILL)
        answered, elected = await asyncio.gather(_first_answer(nc, run_id), _elected(nc, leader))
        await asyncio.sleep(max(0.0, args.down - (time.time() - killed_at)))
        cluster.revive()
        revived = time.monotonic()
        await _caught_up(nc, leader)
        catch_up = time.monotonic() - revived
        await asyncio.to_thread(trainer.wait, 600)
        events = await stored(nc, run_id)
    finally:
        await nc.close()
    return {
        "leader": leader,
        "killed_at": killed_at,
        "answered": answered,
        "elected": elected,
        "catch_up": catch_up,
        "events": events,
    }


def bench_failover(args: argparse.Namespace) -> int:
    """Run the failover benchmark and print its figures."""
    if not Path(args.config).is_file():
        raise ConfigError(f"--config: {args.config} is not a file")
    if not 0 < args.kill_at < args.steps:
        raise ConfigError("--kill-at must be between 0 and --steps")
    settings = load_config(Settings)
    setup_logging(settings.log.level, settings.log.format)
    run_id = f"bench-failover-{time.strftime('%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-failover-") as tmp:
        work = Path(tmp)
        cluster = start_cluster(settings.server, work / "cluster", 3)
        trainer: subprocess.Popen[bytes] | None = None
        audit: subprocess.Popen[bytes] | None = None
        try:
            asyncio.run(_provision(cluster, settings))
            env = {**os.environ, "NATS_URL": cluster.url, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            audit = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "audit"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(work / "audit.log").open("wb"),
            )
            log = work / "trainer.log"
            argv = trainer_argv(
                args.config,
                run_id,
                work,
                f"training.max_steps={args.steps}",
                "training.logging_steps=1",
                "training.eval_steps=null",
                "training.save_steps=null",
                "bus.ack_timeout=2",
            )
            with log.open("wb") as out:
                trainer = subprocess.Popen(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            figures = asyncio.run(measure(cluster, settings, run_id, trainer, log, args))
            code = trainer.returncode
        finally:
            for proc in (trainer, audit):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
            cluster.stop()
    _report(args, figures, code)
    return 0


async def _provision(cluster: LocalCluster, settings: Settings) -> None:
    nc = await connect(BusTarget(cluster.url.split(","), "bench"), settings, name="bench-failover")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await ensure_stream(nc.jetstream(timeout=2), StreamSettings(replicas=3))
                return
            except TrainbusError:  # no meta leader yet, or not every node has joined
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


def _rate(steps: list[tuple[TrainStep, float]], start: float, end: float) -> float:
    inside = [s for s, _ in steps if start <= s.time.timestamp() < end]
    if len(inside) < 2:
        return float("nan")
    return (len(inside) - 1) / (inside[-1].time.timestamp() - inside[0].time.timestamp())


def _report(args: argparse.Namespace, f: dict[str, Any], code: int | None) -> None:
    events: list[tuple[Event, float]] = f["events"]
    trainer = [(e, t) for e, t in events if e.source == "trainer"]
    steps = [(e, t) for e, t in trainer if isinstance(e, TrainStep)]
    kill = f["killed_at"]
    before = _rate(steps, kill - args.window, kill)
    after = _rate(steps, kill, kill + args.window)
    stall = max((t - e.time.timestamp() for e, t in trainer if e.time.timestamp() >= kill - 1), default=0.0)
    lost, twice = lost_and_twice([e for e, _ in events])
    last = max((s.step for s, _ in steps), default=0)
    print(f"failover: 3-node cluster on loopback; {args.config}, {args.steps} steps (a train.step each), "
          f"stream leader {f['leader']} SIGKILLed at step {args.kill_at}, restarted after {args.down:g} s")  # fmt: skip
    print(f"  step rate, {args.window:g} s before the kill      {before:8.2f} steps/s")
    print(
        f"  step rate, {args.window:g} s after the kill       {after:8.2f} steps/s   (after/before {after / before:.2f})"
    )
    print(f"  publish stall (worst event after the kill) {stall:8.2f} s")
    print(
        f"  events lost / stored twice                 {lost} / {twice}   (of {len(events)}; last step {last}, trainer exit {code})"
    )
    print(f"  new stream leader elected after           {f['elected']:8.2f} s")
    print(f"  first command answered after the kill    {f['answered']:8.2f} s   (control is core NATS request/reply)")
    print(f"  restarted node current again after       {f['catch_up']:8.2f} s")
