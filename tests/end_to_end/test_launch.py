"""The launch queue with real processes: `trainbus submit` queues, `trainbus agent`s take the jobs
their slots fit (priority first), cancel and drain work, a SIGKILLed agent's run goes on elsewhere
from its latest checkpoint, the queue survives a nats-server restart, a config the trainer
refuses fails once, and each job sees only its own GPU.

One server and one set of agents per module; the trainings are tens of steps of the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from producers.task.sampledata import write_sample_data
from runtime.bus.server import RunningServer, start_server
from runtime.launch.jobs import JobStore
from runtime.settings import ServerSettings
from schemas import Evaluation, Event, JobState, RunFinished, RunStarted, TrainStep
from schemas.jobs import JobRecord
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of, of_type, pause_on, paused, trainbus_env, wait_events

pytestmark = pytest.mark.slow
SMALL = ["training.max_steps=30", "training.save_steps=10", "training.logging_steps=5", "training.eval_steps=30",
         "data.max_eval_samples=32"]  # fmt: skip
"""A run of 30 steps: checkpoints at 10, 20 and 30, one evaluation at the end."""
LONG = ["training.max_steps=400", "training.save_steps=400", "training.logging_steps=10", "training.eval_steps=400"]
"""A run that holds its slot until it is cancelled (paused at its start by ``hold``: it costs nothing)."""


@dataclass
class Bus:
    server: RunningServer
    store: Path
    tmp: Path
    agents: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=self.tmp, env=trainbus_env(self.url),
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip

    def submit(self, run_id: str, *overrides: str, priority: str = "normal", shared: bool = True) -> str:
        """Queue a run of configs/tiny.yaml on the module's data; ``shared``: its output folder is one
        every agent sees (else each agent writes its own, as machines without a shared disk do)."""
        data = self.data if shared else self.data[:-1]
        sets = [a for item in [*data, *overrides] for a in ("--set", item)]
        done = self.cli("submit", "configs/tiny.yaml", "--run-id", run_id, "--priority", priority, *sets)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[2]  # "queued job j-… for run …"

    @property
    def data(self) -> list[str]:
        d = self.tmp / "data"
        return [f"data.train_file={d / 'train.jsonl'}", f"data.validation_file={d / 'validation.jsonl'}",
                f"data.test_file={d / 'test.jsonl'}", f"training.output_dir={self.tmp / 'runs'}"]  # fmt: skip

    def agent(self, name: str, *args: str) -> subprocess.Popen[str]:
        """An agent in a folder of its own: what it writes (job configs, logs, unshared run folders) is its machine's."""
        log = (self.tmp / f"agent-{name}.log").open("w")
        home = self.tmp / f"host-{name}"
        home.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "agent", "--agent", name, *args], cwd=home,
                                env=trainbus_env(self.url), stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "waiting for jobs" in ready, (ready, (self.tmp / f"agent-{name}.log").read_text()[-2000:])
        self.agents[name] = proc
        return proc

    def records(self) -> dict[str, JobRecord]:
        async def read() -> dict[str, JobRecord]:
            nc = NATS()
            await nc.connect(self.url)
            try:
                return {r.spec.job_id: r for r in await (await JobStore.open(nc.jetstream())).all()}
            finally:
                await nc.close()

        return asyncio.run(read())

    def job(self, job_id: str) -> JobRecord:
        return self.records()[job_id]

    def wait_job(self, job_id: str, *states: str, timeout: float = 180) -> JobRecord:
        return wait_until(lambda: (r := self.job(job_id)).state in states and r, timeout=timeout,
                          what=f"job {job_id} to be {' or '.join(states)}")  # fmt: skip

    def stop_agents(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.agents.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.agents.clear()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    tmp = tmp_path_factory.mktemp("launch")
    write_sample_data(tmp / "data")
    store = tmp / "nats"
    b = Bus(start_server(ServerSettings(), store, lock=False), store, tmp)
    try:
        yield b
    finally:
        b.stop_agents()
        b.server.stop()
        for stray in subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split():
            os.kill(int(stray), signal.SIGKILL)  # an orphaned trainer a failed test left behind


def job_states(events: list[Event], job_id: str) -> list[JobState]:
    return [e for e in events if isinstance(e, JobState) and e.job_id == job_id]


def hold(bus: Bus, run_id: str) -> str:
    """Queue a long run, wait until it runs, paused at its first step: it holds its slot and costs nothing."""
    pausing = pause_on(bus.url, run_id, "run.started")
    job = bus.submit(run_id, *LONG)
    bus.wait_job(job, "running")
    pausing.join(300)
    wait_events(bus.url, run_id, paused)
    return job


def first(events: list[Event], kind: type, **match: Any) -> Any:
    return next(e for e in events if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items()))


def test_agents_take_what_fits_highest_priority_first_and_cancel_and_drain_work(bus: Bus) -> None:
    bus.agent("a1", "--slots", "1")
    bus.agent("a2", "--slots", "1")
    holders = {hold(bus, "hold-1"): "hold-1", hold(bus, "hold-2"): "hold-2"}  # the slots held without training
    by_agent = {bus.job(j).agent: j for j in holders}
    assert set(by_agent) == {"a1", "a2"}  # two jobs at once, one per agent
    low, high, other = bus.submit("low", *SMALL, priority="low"), bus.submit("high", *SMALL, priority="high"), bus.submit("other", *SMALL)  # fmt: skip
    listed = {row["spec"]["job_id"]: row for row in map(json.loads, bus.cli("queue", "--json").stdout.splitlines()) if row["kind"] == "job"}  # fmt: skip
    assert all(listed[j]["state"] == "queued" for j in (low, high, other))
    table = bus.cli("queue").stdout
    assert table.index(high) < table.index(other) < table.index(low)  # position order: priority, then submission

    cancelled = bus.cli("cancel", other)
    assert cancelled.returncode == 0 and "cancelled job" in cancelled.stdout
    assert bus.job(other).state == "cancelled"

    hold1 = by_agent["a1"]
    stop = bus.cli("cancel", hold1, "--wait")  # a running (paused) job: its agent stops it, saving first
    assert stop.returncode == 0, stop.stderr
    assert bus.job(hold1).state == "cancelled"
    assert bus.wait_job(high, "running", "completed").agent == "a1"  # the freed slot: high before low
    assert bus.job(low).state == "queued"
    bus.wait_job(high, "completed")
    assert bus.wait_job(low, "completed").agent == "a1"
    assert not [e for e in events_of(bus.url, "other") if isinstance(e, RunStarted)]  # the cancelled one never ran
    hold_events = events_of(bus.url, holders[hold1])
    assert first(hold_events, RunFinished).status == "stopped" and of_type(hold_events, "checkpoint")

    hold2 = by_agent["a2"]
    pausing = pause_on(bus.url, holders[hold2], "run.started")  # attempt 2's: it holds a1's slot without training
    drained = bus.cli("agent", "--drain", "--agent", "a2", "--requeue")  # a2 checkpoints hold-2, hands it back, exits
    assert drained.returncode == 0, drained.stderr
    bus.agents["a2"].wait(120)
    resumed = bus.wait_job(hold2, "running")
    pausing.join(300)
    assert (resumed.agent, resumed.attempt, resumed.restarts) == ("a1", 2, 0)  # a handover is not a restart
    states = [e.state for e in job_states(events_of(bus.url, holders[hold2]), hold2)]
    assert states[:4] == ["queued", "starting", "running", "requeued"] and states[-2:] == ["starting", "running"]
    assert bus.cli("cancel", hold2, "--no-save", "--wait").returncode == 0
    last = [e for e in events_of(bus.url, holders[hold2]) if e.attempt == 2]
    assert not of_type(last, "checkpoint") and first(last, RunFinished).status == "stopped"


def test_a_killed_agents_run_resumes_elsewhere_from_its_latest_checkpoint_with_nothing_lost(bus: Bus) -> None:
    bus.agent("a3", "--slots", "1")  # beside a1 from the test above
    pausing = pause_on(bus.url, "killed", "checkpoint", 20)  # the orphan must not finish the run meanwhile
    job = bus.submit("killed", *SMALL, shared=False)  # the next agent has no folder of it: all from the bus
    record = bus.wait_job(job, "running")
    pausing.join(300)
    wait_events(bus.url, "killed", paused)
    bus.agents[record.agent or ""].send_signal(signal.SIGKILL)
    requeued = wait_until(lambda: (r := bus.job(job)).restarts and r, timeout=120, what="another agent to take the job")
    assert requeued.agent != record.agent and requeued.restarts == 1
    done = bus.wait_job(job, "completed", timeout=240)
    events = events_of(bus.url, "killed")
    fetched = bus.tmp / f"host-{done.agent}" / "runs" / "killed" / "checkpoint-20"
    assert fetched.is_dir()  # fetched from the object store onto the other agent's "machine"
    assert done.attempt == 2 and first(events, RunStarted, attempt=2).resumed_from_step == 20
    orphan = first(events, RunFinished, attempt=1)
    assert orphan.status == "stopped" and orphan.reason.startswith("fenced:")
    assert (
        max(e.time for e in events if e.attempt == 1 and isinstance(e, TrainStep))
        < first(events, RunStarted, attempt=2).time
    )
    for attempt in (1, 2):  # every attempt's trainer events numbered 1, 2, … without a gap or a repeat
        seqs = [e.seq for e in events if e.attempt == attempt and e.source == "trainer"]
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert len({e.event_id for e in events}) == len(events)
    reference = first(events_of(bus.url, "high"), Evaluation)  # the same config, never interrupted
    final = first(events, Evaluation, attempt=2)
    assert (final.step, final.accuracy) == (reference.step, reference.accuracy)
    assert final.loss == pytest.approx(reference.loss, rel=1e-4)


def test_the_queue_survives_a_server_restart_and_a_refused_config_fails_once(bus: Bus) -> None:
    bus.stop_agents()
    rows = bus.tmp / "bad" / "train.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"text": "Is this fine?", "label": "NO_SUCH_LABEL"}\n')
    bad = bus.submit("refused", *SMALL, f"data.train_file={rows}")
    port = int(bus.url.rsplit(":", 1)[1])
    bus.server.stop()
    bus.server = start_server(ServerSettings(port=port), bus.store, lock=False)
    assert bus.job(bad).state == "queued"
    assert bad in bus.cli("queue").stdout
    bus.agent("gpu", "--gpus", "0,1")
    failed = bus.wait_job(bad, "failed")
    assert f"{rows}:1" in failed.reason and "NO_SUCH_LABEL" in failed.reason and failed.restarts == 0
    time.sleep(3)  # a retry would have started by now
    assert [e.state for e in job_states(events_of(bus.url, "refused"), bad)].count("starting") == 1


def test_each_job_sees_only_its_own_gpu(bus: Bus) -> None:
    jobs = [hold(bus, f"gpu-{n}") for n in (1, 2)]  # both hold a slot of the agent's two GPUs at once
    devices = sorted(first(events_of(bus.url, f"gpu-{n}"), RunStarted).launch.devices for n in (1, 2))
    assert devices == ["0", "1"]
    assert sorted(g for job in jobs for g in bus.job(job).gpus) == [0, 1]
    for job in jobs:
        assert bus.cli("cancel", job, "--no-save", "--wait").returncode == 0
