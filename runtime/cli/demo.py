"""`trainbus demo` (what `make demo` runs): the whole system on the embedded default.

Starts a local nats-server (or uses the bus ``NATS_URL`` / `trainbus up` names), starts the
installed services (audit gate, exporter, dashboard: the ``trainbus.services`` entry points;
on a bus it did not start, only the dashboard) and prints the dashboard's URL before training
starts, so the run can be watched live. Then it trains the tiny default config, replays the run
from the stream and says what happened. Once the audit gate has judged every checkpoint, it serves
the run's best approved one as alias ``risk`` (`trainbus serve`) and prints the Try-it page's link.
With a terminal on stdin everything stays up after the run, until Ctrl-C, and the demo says what
to try; without one (CI) it asks the served model the README's examples (`trainbus predict`),
prints the answers, stops everything and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from importlib.metadata import entry_points
from types import FrameType
from typing import Any

import nats.js.errors

from runtime.bus.connect import BusTarget, connect, resolve_target
from runtime.bus.stream import ensure_stream, replay
from runtime.cli.args import settings_from
from runtime.cli.render import event_row
from runtime.cli.up import service_commands
from runtime.settings import Settings, packaged
from schemas import run_events
from schemas.subjects import CHECKPOINTS_BUCKET

DASHBOARD = "dashboard"
"""The service whose URL the demo prints for the user to open."""
STARTUP_SECONDS = 180.0
"""How long a service may take to say it is ready (its first line) on a loaded machine."""
_URL = re.compile(r"serving (https?://\S+)")
ALIAS = "risk"
"""The alias the demo serves its run's best approved checkpoint as (the README's `--alias risk`)."""
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("I will hurt him tomorrow.", "HIGH_RISK"),
    ("The printer is jammed.", "LOW_RISK"),
    ("Nice weather today.", "NO_RISK"),
)
"""The README's examples, each with the decision the demo's model (the tiny default on its sample
data, which never contains them) gives it; the Try-it page offers the same texts."""
VERDICT_SECONDS = 120.0
"""How long the demo waits for the audit gate to judge the run's checkpoints before it gives up serving."""


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the tiny default end to end on a local bus and watch it in the dashboard")
    p.add_argument(
        "--config", default="configs/tiny.yaml", type=packaged, help="run config to train (default: configs/tiny.yaml)"
    )
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    p.set_defaults(func=cmd_demo)


def _has_command(name: str) -> bool:
    return any(ep.name == name for ep in entry_points(group="trainbus.commands"))


class Service:
    """A service subprocess whose first stdout line says it is ready; later lines are passed on."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        self.first: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, name=f"demo-{name}", daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not self._ready.is_set():
                self.first = line.strip()
                self._ready.set()
            else:
                print(line, end="", flush=True)
        self._ready.set()

    def ready(self, timeout: float = STARTUP_SECONDS) -> str | None:
        """Its first line, or None if it exited (or said nothing) first."""
        self._ready.wait(timeout)
        return self.first

    @property
    def url(self) -> str | None:
        found = _URL.search(self.first or "")
        return found.group(1) if found else None

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait(self) -> None:
        """Until it has exited (killed if it takes more than 20 s)."""
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _start_services(target: BusTarget, env: dict[str, str]) -> list[Service]:
    """Every installed service on a bus the demo started; on someone else's bus, only the dashboard."""
    wanted = {n: argv for n, argv in service_commands().items() if target.server is not None or n == DASHBOARD}
    services = [Service(name, argv, env) for name, argv in wanted.items()]
    for service in services:
        said = service.ready()
        if said is None:
            code = service.process.poll()
            print(f"demo: {service.name} did not start (exit code {code}); carrying on without it", file=sys.stderr)
        else:
            print(f"demo: started {service.name} (pid {service.process.pid}): {said}", flush=True)
    return services


def _train(args: argparse.Namespace, run_id: str, env: dict[str, str]) -> int:
    """`trainbus train` in a child; an interrupt asks it to stop cleanly (it saves and says so)."""
    cmd = [sys.executable, "-m", "runtime.cli", "train", args.config, "--run-id", run_id]
    for item in args.overrides:
        cmd += ["--set", item]
    print(f"demo: training: {' '.join(cmd[2:])}", flush=True)
    trainer = subprocess.Popen(cmd, env=env)
    try:
        return trainer.wait()
    except KeyboardInterrupt:
        trainer.terminate()
        try:
            trainer.wait(60)
        except subprocess.TimeoutExpired:
            trainer.kill()
        raise


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


def _what_to_try(dashboard: str | None, run_id: str, target: BusTarget, services: list[Service]) -> None:
    bus = target.display
    where = f"the dashboard at {dashboard}" if dashboard else "`trainbus dashboard` (start it with NATS_URL set)"
    lines = [
        "demo: the bus and the services stay up until you press Ctrl-C. Things to try in " + where + ":",
        f"  - open run {run_id}: its loss and eval curves, the confusion matrix, the config and the commands",
        "  - Checkpoints & audit: every checkpoint with the audit gate's verdict and reasons",
        "  - start a second run in another terminal and steer it from its Run page (Pause, Resume,",
        "    Set learning rate, Stop), then overlay both on the Compare page:",
        f"      NATS_URL={bus} trainbus train configs/tiny.yaml --set training.max_steps=2000 --run-id second",
        f"  - or steer from the shell: NATS_URL={bus} trainbus ctl pause --run second",
    ]
    if any(s.name == "serve" for s in services):
        lines += [
            f"  - Try it: ask the served model (alias {ALIAS}) your own text, or from the shell:",
            f"      NATS_URL={bus} trainbus predict --alias {ALIAS} {shlex.quote(EXAMPLES[0][0])}",
        ]
    lines += [f"  - {s.name}: {s.url}" for s in services if s.url and s.name not in (DASHBOARD, "serve")]
    print("\n".join(lines), flush=True)


def _stay_up(target: BusTarget, services: list[Service]) -> None:
    """Until Ctrl-C (or SIGTERM), or until the bus the demo started goes away."""
    while target.server is None or target.server.process.poll() is None:
        for service in services:
            if service.process.poll() is not None and service.first is not None:
                print(f"demo: {service.name} exited with {service.process.returncode}", file=sys.stderr, flush=True)
                service.first = None
        time.sleep(0.5)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def _best_step(target: BusTarget, settings: Settings, run_id: str) -> int | None:
    """Once the audit gate has judged every checkpoint of the run (or ``VERDICT_SECONDS`` passed):
    the step of the best approved one it named in its bucket, None when it named none."""
    nc = await connect(target, settings, name="trainbus-demo")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + VERDICT_SECONDS
        while time.monotonic() < deadline:
            events = [item.event async for item in replay(js, run_events(run_id)) if item.event is not None]
            saved = {e.event_id for e in events if e.type == "checkpoint"}
            if saved <= {e.checkpoint_event_id for e in events if e.type == "audit.verdict"}:
                break
            await asyncio.sleep(0.5)
        try:
            entry = await (await js.key_value(CHECKPOINTS_BUCKET)).get(f"{run_id}.best")
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            return None
        return int(json.loads(entry.value or b"{}").get("step", 0))
    finally:
        await nc.close()


def _serve_best(target: BusTarget, settings: Settings, run_id: str, env: dict[str, str]) -> Service | None:
    """`trainbus serve` on the run's best approved checkpoint as ``ALIAS``, once it is loaded; None if there is none."""
    step = asyncio.run(_best_step(target, settings, run_id))
    if step is None:
        print(
            f"demo: the audit gate approved no checkpoint of {run_id}, so there is no model to serve "
            f"(`trainbus checkpoints --run {run_id}` says why)",
            flush=True,
        )
        return None
    argv = [sys.executable, "-m", "runtime.cli", "serve", "--run", run_id, "--alias", ALIAS]
    print(f"demo: serving the best approved checkpoint (step {step}): trainbus {' '.join(argv[3:])}", flush=True)
    serve = Service("serve", argv, env)
    said = serve.ready()
    if said is None or not said.startswith("trainbus serve: serving"):
        print(f"demo: trainbus serve did not start ({said or f'exit code {serve.process.poll()}'})", file=sys.stderr)
        serve.terminate()
        serve.wait()
        return None
    print(f"demo: {said}", flush=True)
    return serve


def _ask_examples(env: dict[str, str]) -> None:
    """What a user types after the README: the served model asked the README's examples, answers printed."""
    argv = [sys.executable, "-m", "runtime.cli", "predict", "--alias", ALIAS, "--no-rationale"]
    argv += [text for text, _ in EXAMPLES]
    print(f"demo: asking the README's examples: trainbus {shlex.join(argv[3:])}", flush=True)
    subprocess.run(argv, env=env, check=False)


def _after_training(
    target: BusTarget, settings: Settings, run_id: str, env: dict[str, str], services: list[Service]
) -> Service | None:
    """Replay the run, list it and its checkpoints, then serve its best approved checkpoint."""
    print(f"demo: replaying run {run_id} from the stream (train.step and heartbeat rows folded):", flush=True)
    counts = asyncio.run(_summarise(target, settings, run_id))
    print("demo: events by type: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for name, extra in (("runs", []), ("checkpoints", ["--run", run_id])):
        if name == "runs" or _has_command(name):
            print(f"demo: trainbus {name} {' '.join(extra)}".rstrip(), flush=True)
            subprocess.run([sys.executable, "-m", "runtime.cli", name, *extra], env=env, check=False)
    serve = _serve_best(target, settings, run_id, env) if _has_command("serve") else None
    if serve is not None:
        services.append(serve)
    return serve


def _demo(args: argparse.Namespace, target: BusTarget, settings: Settings, services: list[Service]) -> int:
    """Everything between starting the bus and stopping it; returns the exit code."""
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {**os.environ, "NATS_URL": ",".join(target.servers)}
    where = "a local nats-server started for the demo" if target.server else f"the bus found via {target.origin}"
    print(f"demo: using {where} at {target.display}", flush=True)
    asyncio.run(_provision(target, settings))
    services += _start_services(target, env)
    dashboard = next((s.url for s in services if s.name == DASHBOARD and s.url), None)
    if dashboard:
        print(f"demo: watch the run live in the dashboard: {dashboard}/run?run={run_id}", flush=True)
    code = _train(args, run_id, env)
    if code != 0:
        print(f"demo: training exited with {code}", file=sys.stderr)
        return code
    serve = _after_training(target, settings, run_id, env, services)
    if serve is not None and dashboard:
        print(f"demo: ask the model on the Try-it page: {dashboard}/tryit (alias {ALIAS})", flush=True)
    if sys.stdin.isatty():
        _what_to_try(dashboard, run_id, target, services)
        _stay_up(target, services)
        return 0
    if serve is not None:
        _ask_examples(env)
    print(
        f"demo: see it again with `trainbus events --run {run_id}` and `trainbus runs` (run `trainbus up` "
        "first to keep a bus running); from a terminal the demo keeps everything up until Ctrl-C",
        flush=True,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    settings = settings_from(
        argparse.Namespace(config=None, overrides=[o for o in args.overrides if o.startswith("bus.")])
    )
    target = resolve_target(settings, announce=False)
    services: list[Service] = []
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    try:
        code = _demo(args, target, settings, services)
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
    finally:
        for service in services:
            service.terminate()
        for service in services:
            service.wait()
        if target.server is not None:
            target.server.stop()
        print(f"demo: stopped {len(services)} service(s){' and the bus' if target.server else ''}", flush=True)
    return code


async def _provision(target: BusTarget, settings: Settings) -> None:
    nc = await connect(target, settings, name="trainbus-demo")
    try:
        await ensure_stream(nc.jetstream(), settings.stream)
    finally:
        await nc.close()
