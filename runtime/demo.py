"""`trainbus demo` (what `make demo` runs): the whole system on the embedded default.

Starts a local nats-server (or uses the one `trainbus up` runs in this folder), starts the
consumers that are installed, trains the tiny default config while they watch, then replays
the run from the stream and says what happened. Without the trainer installed it publishes a
short synthetic run instead, so the bus itself can be seen working.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from runtime.bus import BusTarget, connect, resolve_target
from runtime.commands import service_commands, settings_from
from runtime.publisher import NatsPublisher
from runtime.render import event_row
from runtime.settings import Settings
from runtime.sinks import Stamper
from runtime.stream import ensure_stream, replay
from schemas import Heartbeat, RunFinished, RunStarted, TrainStep, run_events


def register_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the tiny default end to end on a local bus and show what happened")
    p.add_argument("--config", default="configs/tiny.yaml", help="run config to train (default: configs/tiny.yaml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    p.set_defaults(func=cmd_demo)


def _has_command(name: str) -> bool:
    return any(ep.name == name for ep in entry_points(group="trainbus.commands"))


def _synthetic_run(target: BusTarget, settings: Settings, run_id: str) -> None:
    publisher = NatsPublisher(target, settings, outbox_path=Path(settings.state_dir) / f"{run_id}.outbox.jsonl").start()
    stamper = Stamper(publisher, run_id)
    hp = {"learning_rate": 2e-3, "max_grad_norm": 1.0}
    stamper.emit(
        RunStarted,
        config={},
        config_hash="-",
        model="synthetic",
        adapter="none",
        data_fingerprint="-",
        hyperparameters=hp,
    )
    for step in range(1, 6):
        stamper.emit(TrainStep, step=step, epoch=step / 5, loss=2.0 / step, learning_rate=2e-3)
    stamper.emit(Heartbeat, step=5, phase="training")
    stamper.emit(RunFinished, status="completed", step=5, reason="synthetic demo run")
    stats = publisher.close()
    print(f"demo: published {stats.published} events of run {run_id} (acked by JetStream, ids deduplicated)")


async def _summarise(target: BusTarget, settings: Settings, run_id: str) -> Counter[str]:
    nc = await connect(target, settings, name="trainbus-demo")
    counts: Counter[str] = Counter()
    try:
        await ensure_stream(nc.jetstream(), settings.stream)
        async for item in replay(nc.jetstream(), run_events(run_id)):
            if item.event is None:
                continue
            counts[item.event.type] += 1
            if item.event.type not in ("train.step", "heartbeat"):
                print("  " + event_row(item.stream_seq, item.event))
    finally:
        await nc.close()
    return counts


def cmd_demo(args: argparse.Namespace) -> int:
    settings = settings_from(
        argparse.Namespace(config=None, overrides=[o for o in args.overrides if o.startswith("bus.")])
    )
    target = resolve_target(settings, announce=False)
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    children: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "NATS_URL": ",".join(target.servers)}
    try:
        where = "a local nats-server started for the demo" if target.server else f"the bus found via {target.origin}"
        print(f"demo: using {where} at {target.display}")
        asyncio.run(_provision(target, settings))
        if target.server is not None:
            for name, argv in service_commands().items():
                children.append(subprocess.Popen(argv, env=env))
                print(f"demo: started consumer {name}: {' '.join(argv)}")
        if _has_command("train"):
            cmd = [sys.executable, "-m", "runtime.cli", "train", args.config, "--run-id", run_id]
            for item in args.overrides:
                cmd += ["--set", item]
            print(f"demo: training: {' '.join(cmd[2:])}")
            result = subprocess.run(cmd, env=env, check=False)
            if result.returncode != 0:
                print(f"demo: training exited with {result.returncode}", file=sys.stderr)
                return result.returncode
        else:
            _synthetic_run(target, settings, run_id)
        print(f"demo: replaying run {run_id} from the stream (train.step and heartbeat rows folded):")
        counts = asyncio.run(_summarise(target, settings, run_id))
        print("demo: events by type: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        for name, extra in (("runs", []), ("checkpoints", ["--run", run_id])):
            if name == "runs" or _has_command(name):
                print(f"demo: trainbus {name} {' '.join(extra)}".rstrip())
                subprocess.run([sys.executable, "-m", "runtime.cli", name, *extra], env=env, check=False)
        print(
            f"demo: see it again with `trainbus events --run {run_id}` and `trainbus runs` (run `trainbus up` first to keep a bus running)"
        )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        if target.server is not None:
            target.server.stop()
    return 0


async def _provision(target: BusTarget, settings: Settings) -> None:
    nc = await connect(target, settings, name="trainbus-demo")
    try:
        await ensure_stream(nc.jetstream(), settings.stream)
    finally:
        await nc.close()
