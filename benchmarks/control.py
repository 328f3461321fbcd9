"""`trainbus bench control`: how fast a running trainer answers and applies control commands.

Run from the repository root::

    trainbus bench control                   # configs/tiny.yaml, 200 commands
    trainbus bench control --commands 20

It starts an embedded nats-server and a ``trainbus train`` subprocess on the config (eval and
save out of the way, a ``train.step`` every step, ``max_steps`` far off), waits for its
``run.started``, then sends ``set logging_steps=1`` commands (the value it has: harmless) one at a
time with ``send_command(..., wait=True)``. Each command goes out at a random point within a
training step, so the wait for the next step boundary is sampled uniformly.

Three figures decide (issue 13), each over every timed command:

- applied at the first step boundary after it was accepted: the ``applied`` result's step is at
  most the step in the ``accepted`` reply + 1 (the reply names the last boundary the trainer
  passed; the command is taken at that boundary if it came just before the take, else at the next);
- the request → ``accepted`` reply round trip, p99 <= 5 ms;
- that step boundary → the ``applied`` event at this client, p99 <= 5 ms: the event's ``time`` is
  stamped at the boundary, when the command is applied, and this client reads it on a core
  subscription (same host, same clock).

It also prints the request → ``applied`` latency, which waits for the step that was running, and
that latency minus the step's time (the trainer's own ``step_time_seconds`` in its ``train.step``
event). Finally ``stop`` (save=False) ends the trainer.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from benchmarks.common import log_tail, percentile
from consumers.control_client import NoTrainer, build_command, send_command
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream, last_event
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import get_logger, setup_logging
from runtime.settings import Settings, load_config, packaged
from schemas import CommandResult, TrainStep, event_subject

ISSUER = "bench-control"
SLACK_MS = 5.0
ACCEPTED_P99_MS = 5.0
DELIVERY_P99_MS = 5.0


def register(sub: Any) -> None:
    """Add ``control`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("control", help="command accepted/applied latency against a live trainer's step time")
    p.add_argument(
        "--config", default="configs/tiny.yaml", metavar="YAML", type=packaged, help="run config (default: %(default)s)"
    )
    p.add_argument("--commands", type=int, default=200, help="set commands to time")
    p.add_argument("--warmup", type=int, default=5, help="commands sent first and not counted (at least 2)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the trainer to start")
    p.add_argument("--seed", type=int, default=0, help="seed of the random send times")
    p.set_defaults(func=bench_control)


class _TimedRequests:
    """Stands in for the NATS connection in ``send_command``: notes when each request's reply came."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.replied_at = 0.0

    async def subscribe(self, subject: str) -> Any:
        return await self.nc.subscribe(subject)

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:
        msg = await self.nc.request(subject, payload, timeout=timeout)
        self.replied_at = time.perf_counter()
        return msg


@dataclass
class Timing:
    """One command: request → reply, request → applied (ms), and the applied event."""

    accepted_ms: float
    applied_ms: float
    delivery_ms: float
    result: CommandResult
    accepted_step: int | None = None
    """The last step boundary the trainer had passed when it accepted the command."""

    @property
    def at_first_boundary(self) -> bool:
        """Applied at the first step boundary after it was accepted."""
        return (
            self.accepted_step is not None
            and self.result.step is not None
            and self.result.step <= self.accepted_step + 1
        )


@dataclass
class Figures:
    """What the benchmark measured, and each step's time (ms) from the trainer's train.step events."""

    timings: list[Timing] = field(default_factory=list)
    step_ms: dict[int, float] = field(default_factory=dict)
    stop_step: int | None = None

    def slack_ms(self) -> list[float]:
        """Per command: applied latency minus the time of the step it waited in (unknown steps left out)."""
        return [
            t.applied_ms - self.step_ms[t.result.step]
            for t in self.timings
            if t.result.step is not None and t.result.step in self.step_ms
        ]


async def _send(timed: _TimedRequests, run_id: str, i: int, wait_timeout: float = 60.0) -> Timing:
    command = build_command("set", run_id, issued_by=ISSUER, settings=["logging_steps=1"])
    start = time.perf_counter()
    reply, result = await send_command(cast(NATS, timed), command, wait=True, wait_timeout=wait_timeout)
    done, wall = time.perf_counter(), time.time()
    if result is None:
        raise TrainbusError(f"set was rejected by the trainer ({reply.code}): {reply.message}")
    return Timing(
        accepted_ms=(timed.replied_at - start) * 1000,
        applied_ms=(done - start) * 1000,
        delivery_ms=(wall - result.time.timestamp()) * 1000,
        result=result,
        accepted_step=reply.step,
    )


def _step_seconds(timings: list[Timing]) -> float:
    """Seconds per step from the trainer's timestamps on the first and last applied results."""
    first, last = timings[0].result, timings[-1].result
    steps = (last.step or 0) - (first.step or 0)
    return (last.time - first.time).total_seconds() / steps if steps > 0 else float("nan")


async def _wait_started(
    nc: NATS, run_id: str, trainer: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while await last_event(js, event_subject(run_id, "run.started")) is None:
        if trainer.poll() is not None:
            raise TrainbusError(f"the trainer exited with {trainer.returncode}: {log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TrainbusError(f"the trainer did not start within {timeout:g}s: {log_tail(log_path)}")
        await asyncio.sleep(0.5)


async def measure(
    url: str,
    settings: Settings,
    run_id: str,
    trainer: subprocess.Popen[bytes],
    log_path: Path,
    args: argparse.Namespace,
) -> Figures:
    """Wait for the trainer, time the commands, stop it; returns the timings."""
    nc = await connect(BusTarget([url], "embedded"), settings, name="bench-control")
    figures = Figures()

    async def on_step(msg: Msg) -> None:
        event = TrainStep.model_validate_json(msg.data)
        figures.step_ms[event.step] = event.step_time_seconds * 1000

    try:
        await ensure_stream(nc.jetstream(), settings.stream)
        await nc.subscribe(event_subject(run_id, "train.step"), cb=on_step)
        await _wait_started(nc, run_id, trainer, log_path, args.start_timeout)
        timed = _TimedRequests(nc)
        try:
            warm = [await _send(timed, run_id, i, wait_timeout=args.start_timeout) for i in range(max(2, args.warmup))]
        except NoTrainer as exc:
            raise TrainbusError(f"{exc}: {log_tail(log_path)}") from None
        step = _step_seconds(warm)
        step = step if math.isfinite(step) and step > 0 else 0.05  # NaN: the warmup applied all at one step
        rng = random.Random(args.seed)
        for i in range(args.commands):
            await asyncio.sleep(rng.uniform(0, step))  # a random phase within the step
            figures.timings.append(await _send(timed, run_id, i))
        stop = build_command("stop", run_id, issued_by=ISSUER, reason="bench control done", save=False)
        _, stopped = await send_command(nc, stop, wait=True)
        figures.stop_step = stopped.step if stopped is not None else None
    finally:
        await nc.close()
    return figures


def _trainer_argv(config: str, run_id: str, work: Path) -> list[str]:
    data = work / "data"
    overrides = [
        "training.max_steps=100000",
        "training.eval_steps=null",
        "training.save_steps=null",
        "training.logging_steps=1",
        f"training.output_dir={work / 'runs'}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.validation_file={data / 'validation.jsonl'}",
        f"data.test_file={data / 'test.jsonl'}",
        f"state_dir={work / '.trainbus'}",
    ]
    argv = [sys.executable, "-m", "runtime.cli", "train", config, "--run-id", run_id]
    for item in overrides:
        argv += ["--set", item]
    return argv


def bench_control(args: argparse.Namespace) -> int:
    """Run the control benchmark and print its figures."""
    if args.commands < 1 or args.warmup < 0:
        raise ConfigError("--commands must be at least 1 and --warmup at least 0")
    if not Path(args.config).is_file():
        raise ConfigError(f"--config: {args.config} is not a file")
    settings = load_config(Settings)  # TRAINBUS_* environment variables apply
    setup_logging(settings.log.level, settings.log.format)
    log = get_logger(bench="control")
    run_id = f"bench-control-{time.strftime('%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-control-") as tmp:
        work = Path(tmp)
        server = start_server(settings.server, work / "nats")
        trainer: subprocess.Popen[bytes] | None = None
        log_path = work / "trainer.log"
        try:
            with log_path.open("wb") as out:
                trainer = subprocess.Popen(
                    _trainer_argv(args.config, run_id, work),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "NATS_URL": server.url},
                )
            log.debug("trainer started", pid=trainer.pid, run_id=run_id)
            figures = asyncio.run(measure(server.url, settings, run_id, trainer, log_path, args))
            try:
                code: int | None = trainer.wait(120)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            if trainer is not None and trainer.poll() is None:
                trainer.terminate()
                try:
                    trainer.wait(30)
                except subprocess.TimeoutExpired:
                    trainer.kill()
                    trainer.wait()
            server.stop()
    _report(args, figures, code)
    return 0


def _report(args: argparse.Namespace, figures: Figures, code: int | None) -> None:
    t = figures.timings
    step_ms = _step_seconds(t) * 1000
    steps = [figures.step_ms[x.result.step] for x in t if x.result.step in figures.step_ms]
    accepted = [x.accepted_ms for x in t]
    applied = [x.applied_ms for x in t]
    delivery = [x.delivery_ms for x in t]
    slack = figures.slack_ms()
    first, last = t[0].result.step, t[-1].result.step

    def line(values: list[float]) -> str:
        return (
            f"p50 {statistics.median(values):>7.2f} ms  p99 {percentile(values, 0.99):>7.2f} ms  "
            f"max {max(values):>7.2f} ms  (n={len(values)})"
        )

    print(
        f"trainbus bench control: {args.config} on an embedded nats-server; {len(t)} `set logging_steps=1` "
        "commands sent one at a time, each at a random point within a step"
    )
    print(f"trainer step time (mean)                   {step_ms:>7.2f} ms  (steps {first}..{last}, trainer clock)")
    print(f"  the steps the commands waited in         {line(steps)}")
    print(f"accepted  request -> reply                 {line(accepted)}")
    print(f"applied   request -> command.result        {line(applied)}")
    print(f"          step boundary -> client          {line(delivery)}")
    print(f"          minus the step it waited in      {line(slack)}")
    at_first = sum(x.at_first_boundary for x in t)
    print(
        f"1. applied at the first step boundary after accepted: {at_first}/{len(t)} "
        f"({'met' if at_first == len(t) else 'NOT met'})"
    )
    for n, (name, values, target) in enumerate(
        (
            ("accepted round trip", accepted, ACCEPTED_P99_MS),
            ("step boundary -> applied event", delivery, DELIVERY_P99_MS),
        ),
        2,
    ):
        p99 = percentile(values, 0.99)
        print(f"{n}. {name} p99 {p99:.2f} ms, target <= {target:g} ms ({'met' if p99 <= target else 'NOT met'})")
    within = sum(s <= SLACK_MS for s in slack)
    print(f"applied within its step time + {SLACK_MS:g} ms: {within}/{len(slack)} commands")
    exited = f"exited with {code}" if code is not None else "did not exit within 120 s (terminated)"
    print(f"trainer stopped (stop, save=False) at step {figures.stop_step}; {exited}")
