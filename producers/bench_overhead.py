"""`trainbus bench overhead`: what trainbus costs a training run, plain Trainer vs trainbus side by side.

Run from the repository root::

    trainbus bench overhead                      # configs/tiny.yaml, 100 steps, 2 rounds
    trainbus bench overhead --steps 20 --rounds 1

The same config is trained by (A) the bare ``transformers.Trainer`` of ``build_trainer(prep, [])``
and (B) the same trainer with a ``TrainbusCallback`` publishing to an embedded nats-server while
a live consumer (``trainbus events --follow --json``) reads the run's events. ``logging_steps=1``
in both, so B publishes a ``train.step`` every step (the worst case); eval and save are off.
Rounds alternate A B A B, each variant in a fresh process (``producers.bench_worker``) so its
peak RSS is its own. Steps/s is timed around ``trainer.train()``. The figures are ratios of
variants measured in one run on one machine; absolute values depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from producers.bench_worker import VARIANTS
from producers.config import RunConfig
from producers.sampledata import write_sample_data
from runtime.bus import BusTarget, connect
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import get_logger, setup_logging
from runtime.natsserver import start_server
from runtime.settings import Settings, load_config
from runtime.stream import ensure_stream

LABELS = {"plain": "A plain Trainer", "trainbus": "B trainbus + consumer"}
RATIO_TARGET = 0.99
RSS_TARGET_MB = 50.0


def register(sub: Any) -> None:
    """Add ``overhead`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("overhead", help="steps/s and peak RSS: plain Trainer vs trainbus with a live bus and consumer")
    p.add_argument("--config", default="configs/tiny.yaml", metavar="YAML", help="run config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="training steps per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of A then B")
    p.set_defaults(func=bench_overhead)


def _overrides(work: Path, steps: int) -> list[str]:
    data = work / "data"
    return [
        f"training.max_steps={steps}",
        "training.eval_steps=null",
        "training.save_steps=null",
        "training.logging_steps=1",
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


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_variant(variant: str, config: str, overrides: list[str], run_id: str, work: Path, url: str) -> dict[str, Any]:
    """Train one variant in a fresh ``producers.bench_worker`` process; returns its figures.

    For ``trainbus`` a live consumer reads the run's events meanwhile; ``consumed`` says how
    many it had read once the run was over (it should equal ``published``).
    """
    env = {**os.environ, "NATS_URL": url}
    log_path, result = work / f"{run_id}.log", work / f"{run_id}.json"
    events_path = work / f"{run_id}.events.jsonl"
    consumer: subprocess.Popen[bytes] | None = None
    if variant == "trainbus":
        with events_path.open("wb") as out, (work / f"{run_id}.consumer.log").open("wb") as err:
            consumer = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "events", "--run", run_id, "--follow", "--json"],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )
    try:
        argv = [sys.executable, "-m", "producers.bench_worker", variant, config, "--run-id", run_id]
        argv += ["--result", str(result)]
        for item in overrides:
            argv += ["--set", item]
        with log_path.open("wb") as log:
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        if code != 0 or not result.exists():
            raise TrainbusError(f"bench worker {variant} exited with {code}: {_tail(log_path)}")
        figures: dict[str, Any] = json.loads(result.read_text())
        if consumer is not None:
            deadline = time.monotonic() + 15
            while _count_lines(events_path) < figures["published"] and time.monotonic() < deadline:
                if consumer.poll() is not None:
                    break
                time.sleep(0.1)
            figures["consumed"] = _count_lines(events_path)
        return figures
    finally:
        if consumer is not None:
            consumer.terminate()
            try:
                consumer.wait(10)
            except subprocess.TimeoutExpired:
                consumer.kill()
                consumer.wait()


def _row(round_no: int, figures: dict[str, Any]) -> str:
    rate = figures["steps"] / figures["seconds"]
    line = (
        f"round {round_no}  {LABELS[figures['variant']]:<22} {rate:>8.2f} steps/s  "
        f"({figures['steps']} steps in {figures['seconds']:.2f} s)  peak RSS {figures['peak_rss_mb']:>7.1f} MB"
    )
    if figures["variant"] == "trainbus":
        line += f"  published {figures['published']} events, consumer read {figures.get('consumed', 0)}"
        if figures["outbox_pending"]:
            line += f", {figures['outbox_pending']} left in the outbox"
    return line


def bench_overhead(args: argparse.Namespace) -> int:
    """Run the overhead benchmark and print its figures."""
    if args.steps < 1 or args.rounds < 1:
        raise ConfigError("--steps and --rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-overhead-") as tmp:
        work = Path(tmp)
        overrides = _overrides(work, args.steps)
        cfg = load_config(RunConfig, args.config, overrides)  # fail here, not in a worker, on a bad config
        setup_logging(cfg.log.level, cfg.log.format)
        log = get_logger(bench="overhead")
        write_sample_data(work / "data")
        server = start_server(cfg.server, work / "nats")
        try:
            asyncio.run(_provision(server.url, cfg))
            print(
                f"trainbus bench overhead: {args.config}, {args.steps} steps per variant, logging_steps=1 "
                f"(a train.step event every step), eval/save off, {args.rounds} round(s) of A then B"
            )
            print(f"embedded nats-server {server.url}; B's live consumer: trainbus events --follow --json")
            stamp = time.strftime("%H%M%S")
            results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for round_no in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    run_id = f"bench-{variant}-{stamp}-{round_no}"
                    log.debug("running variant", variant=variant, run_id=run_id)
                    figures = run_variant(variant, args.config, overrides, run_id, work, server.url)
                    results[variant].append(figures)
                    print(_row(round_no, figures), flush=True)
        finally:
            server.stop()
    _summary(results)
    return 0


def _summary(results: dict[str, list[dict[str, Any]]]) -> None:
    rate = {v: statistics.mean(f["steps"] / f["seconds"] for f in rs) for v, rs in results.items()}
    rss = {v: statistics.mean(f["peak_rss_mb"] for f in rs) for v, rs in results.items()}
    ratio = rate["trainbus"] / rate["plain"]
    extra = rss["trainbus"] - rss["plain"]
    print(f"mean      A {rate['plain']:.2f} steps/s, peak RSS {rss['plain']:.1f} MB")
    print(f"          B {rate['trainbus']:.2f} steps/s, peak RSS {rss['trainbus']:.1f} MB")
    print(
        f"ratio B/A steps/s     {ratio:>7.3f}     target >= {RATIO_TARGET}  ({'met' if ratio >= RATIO_TARGET else 'NOT met'})"
    )
    print(
        f"peak RSS B-A       {extra:>+8.1f} MB  target <= +{RSS_TARGET_MB:.0f} MB  "
        f"({'met' if extra <= RSS_TARGET_MB else 'NOT met'})"
    )
