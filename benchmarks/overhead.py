"""`trainbus bench overhead`: what trainbus costs a training run, plain Trainer vs trainbus side by side.

Run from the repository root::

    trainbus bench overhead                      # configs/tiny.yaml, 200 steps a variant and phase, a train.step every step
    trainbus bench overhead --logging-steps 10   # the config's cadence instead of the worst case
    trainbus bench overhead --fast               # and (c): fast steps (~15 ms), everything on the same cores

The same config is trained by (A) the bare ``transformers.Trainer`` of ``build_trainer(prep, [])``
and (B) the same trainer with a ``TrainbusCallback`` publishing to an embedded nats-server while
a live consumer (``trainbus events --follow --json``) reads the run's events; eval and save are
off, torch keeps its default thread count. Two phases, each with A and B, tell apart the two costs
a user can tell apart:

- **own cores** (a): what trainbus costs inside the training process. A and B run on all cores
  but one (``sched_setaffinity`` before Python starts, so torch's default thread count follows);
  nats-server, the consumer and B's publisher process, if it has one, run on the last core. On a
  2-core machine that leaves the trainer one core and torch one thread: the only way to keep the
  bus off the trainer's cores there. Targets: steps/s B/A >= 0.99, CPU per step (the training
  process's own CPU time, all its threads) <= +1 %, peak RSS <= +50 MB.
- **shared cores** (b): what running the bus and the consumer on the same machine costs: nothing
  pinned, torch at its default threads over every core, the bus processes competing for them.
- **fast steps** (c, ``--fast``): (b) with the small model on batches of 4 short rows, LoRA alone
  (``FAST_OVERRIDES``: a step of 10-15 ms on 2 cores), so the bus's cost per event weighs most.
  Targets: steps/s B/A >= 0.97, CPU per step <= +2 %.

Each variant trains in a process of its own (``benchmarks.overhead_worker``, so its peak RSS is its
own), and the two take turns block by block, A B then B A, while the other waits at a step
boundary. Machine speed on a shared host drifts by tens of percent over seconds; turns of about
a second put A and B through the same drift, and block *i* of both trains on the same batches
(same seed). The first block is a warm-up and is left out. A ratio is the total over the block
pairs; a bootstrap over the pairs gives its 95% interval, the resolution of this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import log_tail
from benchmarks.overhead_report import VARIANTS, Phase, summary
from producers.config import RunConfig
from producers.task.sampledata import write_sample_data
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import setup_logging
from runtime.settings import Settings, load_config, packaged

FAST_OVERRIDES = [
    "training.per_device_train_batch_size=4", "data.max_length=64", "adapter.r=8", "adapter.modules_to_save=[]",
]  # fmt: skip
"""Phase (c): the same 2-layer model, LoRA only, batches of 4 short rows: a step of 10-15 ms on 2 cores."""
PHASES = ("own", "shared", "fast")
SETTLE_S = 0.05  # between turns, so one variant's last event is handled before the other's clock starts
START_TIMEOUT_S = 300.0
BLOCK_TIMEOUT_S = 120.0


def register(sub: Any) -> None:
    """Add ``overhead`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("overhead", help="steps/s and peak RSS: plain Trainer vs trainbus with a live bus and consumer")
    p.add_argument(
        "--config", default="configs/tiny.yaml", metavar="YAML", type=packaged, help="run config (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per variant and phase (default: %(default)s)")
    p.add_argument("--block", type=int, default=10, help="steps per turn (default: %(default)s)")
    p.add_argument(
        "--logging-steps",
        type=int,
        default=1,
        metavar="N",
        help="log (and publish train.step) every N steps in both (default: 1)",
    )
    p.add_argument(
        "--phases", default="own,shared", help="own (a), shared (b), fast (c), comma-separated (default: %(default)s)"
    )
    p.add_argument("--fast", action="store_true", help="add phase (c): fast steps, everything on the same cores")
    p.add_argument("--aa", action="store_true", help="B trains plain too: the noise floor of every figure (A/A)")
    p.set_defaults(func=bench_overhead)


def _overrides(work: Path, steps: int, logging_steps: int | None) -> list[str]:
    data = work / "data"
    return [
        f"training.max_steps={steps}",
        "training.eval_steps=null",
        "training.save_steps=null",
        *([f"training.logging_steps={logging_steps}"] if logging_steps is not None else []),
        f"training.output_dir={work / 'runs'}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.validation_file={data / 'validation.jsonl'}",
        f"data.test_file={data / 'test.jsonl'}",
        f"state_dir={work / '.trainbus'}",
    ]


async def _provision(url: str, settings: Settings) -> None:
    nc = await connect(BusTarget([url], "embedded"), settings, name="bench-overhead")
    try:
        await ensure_stream(nc.jetstream(), settings.stream)
    finally:
        await nc.close()


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


class Worker:
    """One ``benchmarks.overhead_worker`` process and the two pipes that pace it."""

    def __init__(
        self, variant: str, argv: list[str], log_path: Path, env: dict[str, str], cpus: list[int] | None
    ) -> None:
        self.variant = variant
        self.log_path = log_path
        control_r, self._control = os.pipe()
        self._report, report_w = os.pipe()
        argv = [*argv, "--control-fd", str(control_r), "--report-fd", str(report_w)]
        # pinned before Python starts, so that torch's default thread count follows the cores it has
        pin: Callable[[], None] | None = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(control_r, report_w),
                preexec_fn=pin,  # one syscall; the coordinator runs no threads
            )
        os.close(control_r)
        os.close(report_w)
        self._buffer = b""

    def go(self) -> None:
        os.write(self._control, b"go\n")

    def receive(self, timeout: float) -> dict[str, Any]:
        """The worker's next report line, parsed; a clear error if it died or hung."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._report], [], [], max(0.0, left))
            chunk = os.read(self._report, 65536) if ready else b""
            if not chunk:
                code = self.proc.poll()
                why = f"exited with {code}" if ready or code is not None else f"sent nothing for {timeout:.0f} s"
                raise TrainbusError(f"bench worker {self.variant} {why}: {log_tail(self.log_path)}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        report: dict[str, Any] = json.loads(line)
        return report

    def close(self) -> None:
        for fd in (self._control, self._report):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start_consumer(run_id: str, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    events_path = work / f"{run_id}.events.jsonl"
    with events_path.open("wb") as out, (work / f"{run_id}.consumer.log").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "events", "--run", run_id, "--follow", "--json"],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return proc, events_path


def _cores(phase: str) -> tuple[list[int] | None, list[int] | None]:
    """(trainer cores, bus cores) of a phase; (None, None): nothing pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if phase != "own" or len(cpus) < 2:
        return None, None
    return cpus[:-1], cpus[-1:]


def _pin(pids: list[int], cpus: list[int] | None) -> None:
    every = cpus or sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, every)


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system + t.children_user + t.children_system
    return out


def _interleave(phase: Phase, workers: dict[str, Worker], blocks: int, block: int, bus: dict[str, int]) -> None:
    """Give the workers alternate turns, A B then B A; keeps each one's step seconds, and the bus's CPU."""
    for variant, worker in workers.items():
        phase.about[variant] = worker.receive(START_TIMEOUT_S)  # loaded and waiting before step 1
    publisher = phase.about["trainbus"].get("publisher_pid")
    if publisher is not None:
        bus = {**bus, "publisher process": publisher}
    before = _cpu_seconds(bus)
    for i in range(blocks):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            time.sleep(SETTLE_S)
            workers[variant].go()
            report = workers[variant].receive(BLOCK_TIMEOUT_S)
            phase.wall[variant].append(report["steps"])
            phase.cpu[variant].append(report["cpu"])
        a, b = sum(phase.wall["plain"][i]), sum(phase.wall["trainbus"][i])
        warm = "  (warm-up, left out)" if i == 0 else ""
        print(
            f"{phase.name:<6} block {i + 1:>3}  steps {i * block + 1:>4}-{(i + 1) * block:<4}  A {a * 1000:8.1f} ms  "
            f"B {b * 1000:8.1f} ms  B/A steps/s {a / b:6.3f}{warm}",
            flush=True,
        )
    after = _cpu_seconds(bus)
    phase.bus_cpu = {name: after[name] - before[name] for name in before if name in after}
    if publisher is not None:
        with contextlib.suppress(psutil.Error):
            phase.publisher_rss_mb = psutil.Process(publisher).memory_info().rss / 2**20


def _run_phase(
    phase: Phase, args: argparse.Namespace, work: Path, overrides: list[str], server_pid: int, env: dict[str, str]
) -> None:
    run_ids = {v: f"bench-{v}-{phase.name}-{time.strftime('%H%M%S')}" for v in VARIANTS}
    consumer, events_path = _start_consumer(run_ids["trainbus"], work, env)
    _pin([server_pid, consumer.pid, os.getpid()], phase.bus_cpus)
    workers: dict[str, Worker] = {}
    try:
        for variant in VARIANTS:
            trains = "plain" if args.aa else variant
            argv = [sys.executable, "-m", "benchmarks.overhead_worker", trains, args.config]
            argv += ["--run-id", run_ids[variant], "--block", str(args.block)]
            if phase.bus_cpus:
                argv += ["--bus-cpus", ",".join(map(str, phase.bus_cpus))]
            for item in [*overrides, *(FAST_OVERRIDES if phase.name == "fast" else [])]:
                argv += ["--set", item]
            log = work / f"{phase.name}-{variant}.log"
            workers[variant] = Worker(variant, argv, log, env, phase.trainer_cpus)
        bus = {"nats-server": server_pid, "consumer": consumer.pid}
        _interleave(phase, workers, args.steps // args.block, args.block, bus)
        for variant, worker in workers.items():  # one at a time: neither is timed any more
            worker.go()
            phase.final[variant] = worker.receive(START_TIMEOUT_S)
        deadline = time.monotonic() + 15
        while _count_lines(events_path) < phase.final["trainbus"]["published"] and time.monotonic() < deadline:
            time.sleep(0.1)
        phase.final["trainbus"]["consumed"] = _count_lines(events_path)
    finally:
        for worker in workers.values():
            worker.close()
        consumer.terminate()
        consumer.wait(10)
        _pin([server_pid, os.getpid()], None)


def bench_overhead(args: argparse.Namespace) -> int:
    """Run the overhead benchmark and print its figures."""
    if args.block < 1 or args.steps < 2 * args.block or args.steps % args.block:
        raise ConfigError("--steps must be a multiple of --block and at least two blocks (one is the warm-up)")
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    names += ["fast"] if args.fast and "fast" not in names else []
    if not names or any(p not in PHASES for p in names):
        raise ConfigError("--phases: own, shared, fast, or several of them comma-separated")
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-overhead-") as tmp:
        work = Path(tmp)
        overrides = _overrides(work, args.steps, args.logging_steps)
        cfg = load_config(RunConfig, args.config, overrides)  # fail here, not in a worker, on a bad config
        setup_logging(cfg.log.level, cfg.log.format)
        write_sample_data(work / "data")
        server = start_server(cfg.server, work / "nats")
        env = {**os.environ, "NATS_URL": server.url}
        try:
            asyncio.run(_provision(server.url, cfg))
            print(
                f"trainbus bench overhead: {args.config}, {args.steps} steps per variant and phase in turns of "
                f"{args.block}, logging_steps={cfg.training.logging_steps} in both, eval/save off; embedded "
                f"nats-server; B's live consumer: trainbus events --follow --json; load average {_load()}"
                + ("; A/A: B trains a plain Trainer too (the noise floor)" if args.aa else "")
            )
            for name in names:
                phase = Phase(name, *_cores(name))
                _run_phase(phase, args, work, overrides, server.pid, env)
                phases.append(phase)
        finally:
            server.stop()
    summary(phases)
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
