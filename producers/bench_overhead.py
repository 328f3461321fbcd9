"""`trainbus bench overhead`: what trainbus costs a training run, plain Trainer vs trainbus side by side.

Run from the repository root::

    trainbus bench overhead                      # configs/tiny.yaml, 200 steps in turns of 10
    trainbus bench overhead --logging-steps 1    # the worst case: a train.step event every step

The same config is trained by (A) the bare ``transformers.Trainer`` of ``build_trainer(prep, [])``
and (B) the same trainer with a ``TrainbusCallback`` publishing to an embedded nats-server while
a live consumer (``trainbus events --follow --json``) reads the run's events. Both log at the
config's ``logging_steps`` (``--logging-steps`` overrides it for both; ``1`` has B publish a
``train.step`` every step, the worst case); eval and save are off.

Each variant trains in a process of its own (``producers.bench_worker``, so its peak RSS is its
own), and the two take turns block by block, A B then B A, while the other waits at a step
boundary. Machine speed on a shared host drifts by tens of percent over seconds; turns of about
a second put A and B through the same drift, and block *i* of both trains on the same batches
(same seed). The first block is a warm-up and is left out. The ratio is total A time over total
B time; a bootstrap over the block pairs gives its 95% interval, the resolution of this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from producers.config import RunConfig
from producers.sampledata import write_sample_data
from runtime.bench import log_tail
from runtime.bus import BusTarget, connect
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import setup_logging
from runtime.natsserver import start_server
from runtime.settings import Settings, load_config
from runtime.stream import ensure_stream

VARIANTS = ("plain", "trainbus")  # A, B
LABELS = {"plain": "A plain Trainer", "trainbus": "B trainbus + consumer"}
RATIO_TARGET = 0.99
RSS_TARGET_MB = 50.0


SETTLE_S = 0.05  # between turns, so one variant's last event is handled before the other's clock starts
START_TIMEOUT_S = 300.0
BLOCK_TIMEOUT_S = 120.0
BOOTSTRAP = 2000


def register(sub: Any) -> None:
    """Add ``overhead`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("overhead", help="steps/s and peak RSS: plain Trainer vs trainbus with a live bus and consumer")
    p.add_argument("--config", default="configs/tiny.yaml", metavar="YAML", help="run config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps per variant (default: %(default)s)")
    p.add_argument("--block", type=int, default=10, help="steps per turn (default: %(default)s)")
    p.add_argument("--logging-steps", type=int, metavar="N", help="log (and publish train.step) every N steps in both")
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
    """One ``producers.bench_worker`` process and the two pipes that pace it."""

    def __init__(self, variant: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.variant = variant
        self.log_path = log_path
        control_r, self._control = os.pipe()
        self._report, report_w = os.pipe()
        argv = [*argv, "--control-fd", str(control_r), "--report-fd", str(report_w)]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(control_r, report_w),
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


def _interleave(workers: dict[str, Worker], blocks: int, block: int) -> dict[str, list[list[float]]]:
    """Give the workers alternate turns, A B then B A; returns each one's step seconds, block by block."""
    for worker in workers.values():
        worker.receive(START_TIMEOUT_S)  # loaded and waiting before step 1
    times: dict[str, list[list[float]]] = {v: [] for v in workers}
    for i in range(blocks):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            time.sleep(SETTLE_S)
            workers[variant].go()
            times[variant].append(workers[variant].receive(BLOCK_TIMEOUT_S)["steps"])
        a, b = sum(times["plain"][i]), sum(times["trainbus"][i])
        warm = "  (warm-up, left out)" if i == 0 else ""
        print(
            f"block {i + 1:>3}  steps {i * block + 1:>4}-{(i + 1) * block:<4}  A {a * 1000:8.1f} ms  "
            f"B {b * 1000:8.1f} ms  B/A steps/s {a / b:6.3f}{warm}",
            flush=True,
        )
    return times


def bench_overhead(args: argparse.Namespace) -> int:
    """Run the overhead benchmark and print its figures."""
    if args.block < 1 or args.steps < 2 * args.block or args.steps % args.block:
        raise ConfigError("--steps must be a multiple of --block and at least two blocks (one is the warm-up)")
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-overhead-") as tmp:
        work = Path(tmp)
        overrides = _overrides(work, args.steps, args.logging_steps)
        cfg = load_config(RunConfig, args.config, overrides)  # fail here, not in a worker, on a bad config
        setup_logging(cfg.log.level, cfg.log.format)
        write_sample_data(work / "data")
        server = start_server(cfg.server, work / "nats")
        env = {**os.environ, "NATS_URL": server.url}
        stamp = time.strftime("%H%M%S")
        run_ids = {v: f"bench-{v}-{stamp}" for v in VARIANTS}
        consumer, events_path = None, work / "none"
        workers: dict[str, Worker] = {}
        try:
            asyncio.run(_provision(server.url, cfg))
            print(
                f"trainbus bench overhead: {args.config}, {args.steps} steps per variant in turns of {args.block}, "
                f"logging_steps={cfg.training.logging_steps} in both, eval/save off"
            )
            print(f"embedded nats-server {server.url}; B's live consumer: trainbus events --follow --json")
            consumer, events_path = _start_consumer(run_ids["trainbus"], work, env)
            for variant in VARIANTS:
                argv = [sys.executable, "-m", "producers.bench_worker", variant, args.config]
                argv += ["--run-id", run_ids[variant], "--block", str(args.block)]
                for item in overrides:
                    argv += ["--set", item]
                workers[variant] = Worker(variant, argv, work / f"{variant}.log", env)
            times = _interleave(workers, args.steps // args.block, args.block)
            final: dict[str, dict[str, Any]] = {}
            for variant, worker in workers.items():  # one at a time: neither is timed any more
                worker.go()
                final[variant] = worker.receive(START_TIMEOUT_S)
            deadline = time.monotonic() + 15
            while _count_lines(events_path) < final["trainbus"]["published"] and time.monotonic() < deadline:
                time.sleep(0.1)
            final["trainbus"]["consumed"] = _count_lines(events_path)
        finally:
            for worker in workers.values():
                worker.close()
            if consumer is not None:
                consumer.terminate()
                consumer.wait(10)
            server.stop()
    _summary(times, final)
    return 0


def _interval(values: list[Any], statistic: Any) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``statistic`` over ``values`` (seeded: the same run, the same figures)."""
    rng = random.Random(0)
    boot = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP))
    return boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]


def _total_ratio(pairs: list[tuple[float, float]]) -> float:
    """B/A steps/s over ``pairs`` of (A seconds, B seconds) for the same steps."""
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs)


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


def _summary(times: dict[str, list[list[float]]], final: dict[str, dict[str, Any]]) -> None:
    timed = {v: blocks[1:] for v, blocks in times.items()}  # the first block is the warm-up
    blocks = [(sum(a), sum(b)) for a, b in zip(timed["plain"], timed["trainbus"], strict=True)]
    steps = [p for a, b in zip(timed["plain"], timed["trainbus"], strict=True) for p in zip(a, b, strict=True)]
    rate = {v: len(steps) / sum(sum(block) for block in t) for v, t in timed.items()}
    ratio, (low, high) = _total_ratio(blocks), _interval(blocks, _total_ratio)
    median, (mlow, mhigh) = _median_ratio(steps), _interval(steps, _median_ratio)
    rss = {v: f["peak_rss_mb"] for v, f in final.items()}
    extra = rss["trainbus"] - rss["plain"]
    b = final["trainbus"]
    print(f"A plain Trainer        {rate['plain']:7.2f} steps/s  peak RSS {rss['plain']:7.1f} MB")
    print(
        f"B trainbus + consumer  {rate['trainbus']:7.2f} steps/s  peak RSS {rss['trainbus']:7.1f} MB  "
        f"published {b['published']} events, consumer read {b['consumed']}, outbox {b['outbox_pending']}"
    )
    print(f"ratio B/A steps/s      {ratio:6.3f}  95% interval {low:.3f}-{high:.3f} over {len(blocks)} turns")
    print(f"  median step pair     {median:6.3f}  95% interval {mlow:.3f}-{mhigh:.3f} over {len(steps)} steps")
    verdict = "met" if ratio >= RATIO_TARGET else "NOT met"
    if low < RATIO_TARGET <= high:
        verdict += f"; the interval holds {RATIO_TARGET} too: more --steps narrow it"
    print(f"  target >= {RATIO_TARGET}: {verdict}")
    print(
        f"peak RSS B-A       {extra:>+8.1f} MB  target <= +{RSS_TARGET_MB:.0f} MB  "
        f"({'met' if extra <= RSS_TARGET_MB else 'NOT met'})"
    )
