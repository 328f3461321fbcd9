"""`trainbus bench dashboard`: the dashboard measured in a real headless browser, beside the stream.

    trainbus bench dashboard                  # the full run (a 30-minute watch at the end)
    trainbus bench dashboard --minutes 2      # shorter watch

On a nats-server of its own it publishes a run of ``--steps`` ``train.step`` events, starts
`trainbus dashboard` and opens Chromium (playwright, Debian's ``chromium``) on it, then prints:
how long the replay of that run takes and the Run page's first paint after it; for a live run
at ``--rate`` events/s, the delay from an event's publish time to its step showing on the page
(p50/p99), beside the delay to a plain NATS subscriber of the same subject; the server's RSS
once ``--runs`` runs of ``--steps`` steps are loaded; its CPU while one browser watches the live
run; and its RSS over ``--minutes`` of watching.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from nats.aio.client import Client as NATS

from benchmarks.common import log_tail, percentile, trainer_sink
from runtime.bus.connect import BusTarget
from runtime.bus.server import start_server
from runtime.errors import ConfigError, TrainbusError
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, ServerSettings, Settings, StreamSettings
from schemas import Heartbeat, RunStarted, TrainStep, event_subject

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
"""Debian's chromium, headless, never phoning home (no sandbox: it runs as root in containers)."""
WATCH = """() => {
  window.__steps = [];
  const read = () => {
    const el = document.querySelector('.st-key-live-step [data-testid="stMetricValue"]');
    if (!el) return;
    const value = parseInt(el.textContent.replace(/[^0-9]/g, ''), 10);
    const seen = window.__steps;
    if (!Number.isNaN(value) && (!seen.length || seen[seen.length - 1][1] !== value)) seen.push([Date.now(), value]);
  };
  new MutationObserver(read).observe(document.body, {subtree: true, childList: true, characterData: true});
  read();
}"""
"""Records (wall-clock ms, step) each time the Run page's step changes."""
LINE_MARKS = '[data-testid="stVegaLiteChart"] .mark-line.role-mark path'


def register(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="dashboard latency, replay, memory and CPU in a real headless browser")
    p.add_argument("--steps", type=int, default=100_000, help="train.step events per replayed run (default 100000)")
    p.add_argument("--runs", type=int, default=10, help="runs of --steps steps loaded for the memory figure")
    p.add_argument("--rate", type=float, default=10.0, help="events/s of the live run (default 10)")
    p.add_argument("--latency-events", type=int, default=300, help="live events measured for the latency figure")
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of watching for the RSS figure (default 30)")
    p.set_defaults(func=bench_dashboard)


def chromium() -> str:
    """Debian's chromium (``.ci/apt-packages``); Playwright cannot download its own here."""
    found = os.environ.get("TRAINBUS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise ConfigError("chromium not found: apt-get install chromium (or set TRAINBUS_CHROMIUM)")
    return found


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium driven by playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ConfigError("playwright is not installed: pip install 'trainbus[test]'") from None
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Dashboard:
    """A `trainbus dashboard` subprocess."""

    process: subprocess.Popen[str]
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_dashboard(
    nats_url: str, log: Path, *, cwd: Path | None = None, timeout: float = 120.0, **env: str
) -> Dashboard:
    """Start `trainbus dashboard --port 0` on ``nats_url``; return once it answers its health check."""
    environ = {**os.environ, "NATS_URL": nats_url, **env}
    with log.open("a") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "dashboard", "--port", "0"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=environ, cwd=cwd,
        )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    if "serving " not in first:
        process.wait(30)
        raise TrainbusError(f"trainbus dashboard did not start: {first.strip()} {log_tail(log)}")
    stdout = process.stdout
    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()  # keep the pipe drained
    dashboard = Dashboard(process, first.split("serving ", 1)[1].split()[0], log)
    deadline = time.monotonic() + timeout
    while True:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{dashboard.url}/_stcore/health", timeout=5) as reply,
        ):
            if reply.status == 200:
                return dashboard
        if process.poll() is not None or time.monotonic() > deadline:
            dashboard.stop()
            raise TrainbusError(f"trainbus dashboard never answered at {dashboard.url}: {log_tail(log)}")
        time.sleep(0.2)


def publish_run(target: BusTarget, settings: Settings, tmp: Path, run_id: str, steps: int) -> None:
    """A run of ``steps`` ``train.step`` events, through the trainer's publish path, acked by JetStream."""
    publisher = trainer_sink(target, settings, tmp / f"{run_id}.outbox.jsonl", run_id)
    stamper = Stamper(publisher, run_id)
    stamper.emit(
        RunStarted, config={"bench": True}, config_hash="-", model="bench", adapter="none", data_fingerprint="-",
        hyperparameters={"learning_rate": 1e-3}, max_steps=steps,
    )  # fmt: skip
    for step in range(1, steps + 1):
        loss = 5.0 if step % 9973 == 0 else 1.0 + 1.0 / step
        stamper.emit(TrainStep, step=step, epoch=step / steps, loss=loss, learning_rate=1e-3, grad_norm=0.5)
    publisher.close(120)


@dataclass
class LiveRun:
    """A run publishing ``rate`` ``train.step`` events/s (and heartbeats) from a thread."""

    target: BusTarget
    settings: Settings
    tmp: Path
    run_id: str
    rate: float
    published: dict[int, float] = field(default_factory=dict)
    """step -> publish time (the event's own ``time``, Unix seconds)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LiveRun:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        publisher = trainer_sink(self.target, self.settings, self.tmp / "live.outbox.jsonl", self.run_id)
        stamper = Stamper(publisher, self.run_id)
        stamper.emit(
            RunStarted, config={"bench": "live"}, config_hash="-", model="bench", adapter="none", data_fingerprint="-",
            hyperparameters={"learning_rate": 1e-3}, max_steps=10**9,
        )  # fmt: skip
        step, start = 0, time.monotonic()
        while not self._stop.is_set():
            step += 1
            event = stamper.emit(TrainStep, step=step, epoch=0.0, loss=1.0 / step, learning_rate=1e-3)
            self.published[step] = event.time.timestamp()
            if step % max(1, int(2 * self.rate)) == 0:
                stamper.emit(Heartbeat, step=step, phase="training")
            self._stop.wait(max(0.0, start + step / self.rate - time.monotonic()))
        publisher.close(30)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


class Subscriber:
    """A plain NATS subscriber of the live run's steps: when each arrived (the bus's own delay)."""

    def __init__(self, url: str, subject: str) -> None:
        self.arrived: dict[int, float] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._main(url, subject),), daemon=True
        )
        self._thread.start()
        self._ready.wait(30)

    async def _main(self, url: str, subject: str) -> None:
        self._done = asyncio.Event()
        nc = NATS()
        await nc.connect(url)

        async def seen(msg: Any) -> None:
            self.arrived.setdefault(int(json.loads(msg.data)["step"]), time.time())

        await nc.subscribe(subject, cb=seen)
        self._ready.set()
        await self._done.wait()
        await nc.close()

    def stop(self) -> None:
        if self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


def delays(published: dict[int, float], seen: list[tuple[float, int]]) -> list[float]:
    """For every published step, seconds until a step at least as new was seen."""
    out, i = [], 0
    for step in sorted(published):
        while i < len(seen) and seen[i][1] < step:
            i += 1
        if i == len(seen):
            break
        out.append(seen[i][0] - published[step])
    return out


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.3f} s" if values else "n/a"


def bench_dashboard(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="trainbus-bench-dashboard-"))
    server = start_server(ServerSettings(max_file_bytes=16 << 30), tmp / "nats", lock=False)
    settings = Settings(
        state_dir=str(tmp / ".trainbus"), bus=BusSettings(url=server.url), stream=StreamSettings(max_bytes=8 << 30)
    )
    target = BusTarget([server.url], "bench")
    dashboard: Dashboard | None = None
    live: LiveRun | None = None
    bus: Subscriber | None = None
    print(
        f"bench dashboard: {psutil.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; figures from one run", flush=True
    )
    try:
        publish_run(target, settings, tmp, "replay-0", args.steps)
        dashboard = start_dashboard(server.url, tmp / "dashboard.log")
        proc = psutil.Process(dashboard.process.pid)
        with browser() as chrome:
            page = chrome.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.monotonic()
            page.goto(dashboard.url + "/")  # the first session starts the server's one reader
            server_replay = _wait_replayed(dashboard.log, timeout=1800)
            replay = time.monotonic() - t0
            t1 = time.monotonic()
            _open_run(page, dashboard.url, "replay-0", args.steps)
            paint = time.monotonic() - t1
            print(
                f"replay of {args.steps:,} train.step events into the dashboard: {server_replay} by the server's reader, "
                f"{replay:.2f} s from opening the first page (target <= 5 s); Run page first paint after it: "
                f"{paint:.2f} s (target <= 3 s)",
                flush=True,
            )
            live = LiveRun(target, settings, tmp, "live", args.rate).start()
            bus = Subscriber(server.url, event_subject("live", "train.step"))
            page.goto(f"{dashboard.url}/run?run=live")
            page.locator(".st-key-live-step").wait_for(timeout=120_000)
            page.evaluate(WATCH)
            first = max(live.published, default=0)
            cpu0, wall0 = cpu_seconds(proc), time.monotonic()
            while len(live.published) < first + args.latency_events:
                time.sleep(0.5)
            cpu = (cpu_seconds(proc) - cpu0) / (time.monotonic() - wall0) * 100
            seen = [(ms / 1000, step) for ms, step in page.evaluate("window.__steps")]
            wanted = {s: t for s, t in live.published.items() if s > first + 1}
            page_delays = delays(wanted, seen)
            bus_delays = [bus.arrived[s] - t for s, t in wanted.items() if s in bus.arrived]
            print(
                f"live event published -> step visible on the Run page: p50 {_ms(page_delays, 0.5)}, p99 "
                f"{_ms(page_delays, 0.99)} (n={len(page_delays)}; targets 0.5 s / 1 s; LlamaBoard polls every 2 s); "
                f"-> plain NATS subscriber: p50 {_ms(bus_delays, 0.5)}, p99 {_ms(bus_delays, 0.99)}",
                flush=True,
            )
            print(
                f"server CPU while one browser watches a live run at {args.rate:g} events/s: {cpu:.1f} % of one core (target <= 15 %)",
                flush=True,
            )
            for i in range(1, args.runs):
                publish_run(target, settings, tmp, f"replay-{i}", args.steps)
            _open_run(page, dashboard.url, f"replay-{args.runs - 1}", args.steps, timeout=1800)
            print(
                f"server RSS with {args.runs} runs x {args.steps:,} steps (+ the live run): {proc.memory_info().rss / 2**20:.0f} MB (target <= 300 MB)",
                flush=True,
            )
            _watch(proc, args.minutes)
    finally:
        if bus is not None:
            bus.stop()
        if live is not None:
            live.stop()
        if dashboard is not None:
            dashboard.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _wait_replayed(log: Path, timeout: float) -> str:
    """The reader's own report of its replay (it logs when it has caught up), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "replayed the stream" in line:
                with contextlib.suppress(ValueError, KeyError):
                    record = json.loads(line)
                    return f"{record['seconds']:.2f} s for {record['events']:,} events"
        time.sleep(0.05)
    raise TrainbusError(f"the dashboard did not replay the stream within {timeout:.0f} s: {log_tail(log)}")


def _open_run(page: Any, url: str, run_id: str, steps: int, timeout: float = 600) -> None:
    """Open a run's page and wait until its step and its six training charts are drawn."""
    page.goto(f"{url}/run?run={run_id}")
    page.locator(".st-key-live-step").get_by_text(str(steps), exact=True).wait_for(timeout=timeout * 1000)
    page.wait_for_function(f"document.querySelectorAll('{LINE_MARKS}').length >= 6", timeout=timeout * 1000)


def _watch(proc: psutil.Process, minutes: float) -> None:
    """RSS of the server while the browser keeps watching the live run."""
    samples: list[float] = []
    cpu0, wall0 = cpu_seconds(proc), time.monotonic()
    end = wall0 + minutes * 60
    while True:
        samples.append(proc.memory_info().rss / 2**20)
        if time.monotonic() >= end:
            break
        time.sleep(min(10.0, max(0.0, end - time.monotonic())))
    cpu = (cpu_seconds(proc) - cpu0) / max(1e-9, time.monotonic() - wall0) * 100
    growth = (samples[-1] - samples[0]) / samples[0] * 100 if samples[0] else math.nan
    print(
        f"server RSS over {minutes:g} min of one browser watching the live run: {samples[0]:.0f} -> {samples[-1]:.0f} MB "
        f"({growth:+.1f} %, max {max(samples):.0f} MB; target within 10 %); CPU over that time {cpu:.1f} % of one core",
        flush=True,
    )
