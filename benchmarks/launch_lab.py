"""The test bench of `trainbus bench launch`: an embedded nats-server of its own, the sample data,
agents each in a folder of its own (its "machine": no run folder is shared, checkpoints travel over
the bus), and ``Arrivals``, which notes when each event of interest reaches this process.

Every figure of the launch benchmark is a difference of two instants on this process's monotonic
clock: a command started here, or an event arrived here on a core subscription to every run's
events (a trainer's publisher and the agents publish them as they happen).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from benchmarks.common import log_tail
from runtime.bus.server import RunningServer
from runtime.errors import TrainbusError
from schemas import ALL_EVENTS, JobState, RunStarted, TrainStep, parse_event

POLL_SECONDS = 0.02
"""How often a wait looks at what arrived (the instants themselves are taken on arrival)."""


@dataclass
class Arrivals:
    """When each event of interest arrived: per (run, kind, attempt) every instant, in order; a job's
    states count as kinds ``job.<state>`` (of no attempt). Also the highest ``train.step`` per
    (run, attempt) and each run's latest ``resumed_from_step``."""

    seen: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    step: dict[tuple[str, int], int] = field(default_factory=dict)
    resumed_from: dict[str, int | None] = field(default_factory=dict)

    async def follow(self, nc: NATS) -> None:
        await nc.subscribe(ALL_EVENTS, cb=self._on)

    async def _on(self, msg: Msg) -> None:
        now = time.monotonic()
        try:
            event = parse_event(msg.data)
        except ValueError:  # not an event, or one of a newer schema: nothing this bench waits for
            return
        if isinstance(event, JobState):
            self.seen.setdefault((event.run_id, f"job.{event.state}", 0), []).append(now)
            return
        self.seen.setdefault((event.run_id, event.type, event.attempt), []).append(now)
        if isinstance(event, TrainStep):
            key = (event.run_id, event.attempt)
            self.step[key] = max(self.step.get(key, 0), event.step)
        elif isinstance(event, RunStarted):
            self.resumed_from[event.run_id] = event.resumed_from_step

    def at(self, run_id: str, kind: str, attempt: int = 1, after: float = 0.0) -> float | None:
        """The first instant after ``after`` a ``kind`` event of ``run_id`` arrived, if one has."""
        times = self.seen.get((run_id, kind, 0 if kind.startswith("job.") else attempt), [])
        return next((t for t in times if t > after), None)

    async def wait(self, run_id: str, kind: str, attempt: int = 1, *, after: float = 0.0, timeout: float = 300.0) -> float:  # fmt: skip
        """``at``, once it is known."""
        deadline = time.monotonic() + timeout
        while (instant := self.at(run_id, kind, attempt, after)) is None:
            if time.monotonic() > deadline:
                raise TrainbusError(f"no {kind} of run {run_id} (attempt {attempt}) within {timeout:g} s")
            await asyncio.sleep(POLL_SECONDS)
        return instant


@dataclass
class Lab:
    """The bench's bus, data and agents, all under ``work``."""

    server: RunningServer
    work: Path
    config: str
    threads: str
    agents: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Every child's environment: this bus, and the same torch threads for a trainer started by
        hand and one an agent starts (an agent keeps a thread count the user set)."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
        return {**keep, "NATS_URL": self.server.url, "OMP_NUM_THREADS": self.threads}

    def data(self) -> list[str]:
        """``--set`` items naming the sample data (absolute: every agent's folder reads the same files)."""
        d = self.work / "data"
        return [f"data.train_file={d / 'train.jsonl'}", f"data.validation_file={d / 'validation.jsonl'}",
                f"data.test_file={d / 'test.jsonl'}"]  # fmt: skip

    def agent(self, name: str, slots: int) -> subprocess.Popen[str]:
        """Start `trainbus agent` in a folder of its own and wait until it takes jobs."""
        home = self.work / f"host-{name}"
        home.mkdir(exist_ok=True)
        log = self.work / f"agent-{name}.log"
        argv = [sys.executable, "-m", "runtime.cli", "agent", "--agent", name, "--slots", str(slots)]
        proc = subprocess.Popen(argv, cwd=home, env=self.env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        assert proc.stdout is not None
        if "waiting for jobs" not in proc.stdout.readline():
            raise TrainbusError(f"agent {name} did not start: {log_tail(log)}")
        self.agents[name] = proc
        return proc

    def stop_agent(self, name: str) -> None:
        """SIGTERM drains an agent: it exits once its jobs end (the bench has them end first)."""
        proc = self.agents.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()

    def lose_host(self, name: str) -> None:
        """SIGKILL an agent and every process it started at one instant: its host is lost."""
        proc = self.agents.pop(name)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                continue
        proc.wait(30)

    def close(self) -> None:
        for name in list(self.agents):
            self.lose_host(name)
        self.server.stop()
