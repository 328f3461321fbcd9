"""The launch queue on a real nats-server: queueing, positions, cancelling, and writers racing."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS

from runtime.bus.server import start_server
from runtime.bus.stream import replay
from runtime.launch.jobs import Conflict, JobStore, moved
from runtime.launch.queue import cancel, enqueue, ensure_queue, waiting_order
from runtime.settings import ServerSettings, Settings
from schemas import run_events
from schemas.jobs import JobSpec, JobState
from schemas.subjects import JOBS_BUCKET, QUEUE_STREAM, dispatch_consumer
from tests.conftest import REPO
from tests.end_to_end.conftest import trainbus_env


def spec(n: int, priority: str = "normal") -> JobSpec:
    return JobSpec(job_id=f"j-q{n:04d}", run_id=f"queued-{n}", config_name="configs/tiny.yaml",
                   config_yaml="run_name: q\n", priority=priority)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture
async def js(nc: NATS, settings: Settings):  # type: ignore[no-untyped-def]
    js = nc.jetstream()
    await ensure_queue(js, settings.stream)
    await js.purge_stream(QUEUE_STREAM)
    kv = await js.key_value(JOBS_BUCKET)
    for key in await _keys(kv):
        await kv.purge(key)
    return js


async def _keys(kv):  # type: ignore[no-untyped-def]
    try:
        return await kv.keys()
    except Exception:
        return []


async def job_events(js, run_id: str) -> list[JobState]:  # type: ignore[no-untyped-def]
    return [d.event async for d in replay(js, run_events(run_id)) if isinstance(d.event, JobState)]


async def test_queued_jobs_wait_in_priority_order_and_say_so_in_their_runs_stream(js) -> None:  # type: ignore[no-untyped-def]
    low, normal, high = (
        await enqueue(js, spec(1, "low")),
        await enqueue(js, spec(2)),
        await enqueue(js, spec(3, "high")),
    )
    assert [r.state for r in (low, normal, high)] == ["queued"] * 3
    records = await (await JobStore.open(js)).all()
    assert [r.spec.job_id for r in waiting_order(records)] == ["j-q0003", "j-q0002", "j-q0001"]
    events = await job_events(js, "queued-3")
    assert [(e.state, e.seq, e.source, e.event_id) for e in events] == [
        ("queued", 1, "launch", "queued-3.launch.j-q0003.1")
    ]
    again = await enqueue(js, spec(3, "high"))  # a retried submit: the same job, not a second one
    assert again.queue_seq == high.queue_seq and len(await job_events(js, "queued-3")) == 1


async def test_a_cancelled_waiting_job_leaves_the_queue_and_no_agent_ever_gets_it(js) -> None:  # type: ignore[no-untyped-def]
    await enqueue(js, spec(4))
    cancelled = await cancel(js, "j-q0004", save=True)
    assert cancelled.state == "cancelled" and cancelled.reason == "cancelled while waiting"
    assert [e.state for e in await job_events(js, "queued-4")] == ["queued", "cancelled"]
    pull = await js.pull_subscribe_bind(dispatch_consumer("normal"), QUEUE_STREAM)
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await pull.fetch(1, timeout=1.0)
    with pytest.raises(Conflict, match="cancelled already"):
        await cancel(js, "j-q0004", save=True)


async def test_two_writers_racing_for_one_job_one_wins_and_the_other_is_told(js) -> None:  # type: ignore[no-untyped-def]
    record = await enqueue(js, spec(5))
    store = await JobStore.open(js)

    def claim_by(agent: str):  # type: ignore[no-untyped-def]
        def change(current):  # type: ignore[no-untyped-def]
            if current.transitions != record.transitions:
                raise Conflict(f"taken by {current.agent}")
            return moved(current, "starting", agent=agent)

        return change

    results = await asyncio.gather(
        store.change("j-q0005", claim_by("a1")), store.change("j-q0005", claim_by("a2")), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, Conflict)]
    assert len(won) == 1 and len(lost) == 1
    final = (await store.get("j-q0005")).record
    assert final.agent == won[0].agent and final.transitions == 2
    assert [e.state for e in await job_events(js, "queued-5")] == ["queued", "starting"]


async def test_a_running_job_is_cancelled_by_asking_its_agent(js) -> None:  # type: ignore[no-untyped-def]
    await enqueue(js, spec(6))
    store = await JobStore.open(js)
    await store.change("j-q0006", lambda r: moved(r, "starting", agent="a1"))
    asked = await cancel(js, "j-q0006", save=False)
    assert asked.state == "starting" and asked.cancel == "no-save"  # the agent stops it and records how it ended


def test_submit_prints_its_job_on_stdout_and_its_logs_on_stderr(tmp_path: Path) -> None:
    """On a new bus `submit` creates the events stream, and logs so on stderr: stdout holds its one
    line, which scripts read the job id from."""
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    try:
        argv = [sys.executable, "-m", "runtime.cli", "submit", "configs/tiny.yaml", "--run-id", "r1"]
        done = subprocess.run(argv, cwd=REPO, env=trainbus_env(server.url), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"queued job j-[0-9a-f]{10} for run r1 \(.*\)\n", done.stdout), done.stdout
    assert "stream created" in done.stderr
