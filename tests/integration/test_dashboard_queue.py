"""The Queue and New run pages through Streamlit's AppTest, against a real nats-server.

The queue state is recorded on the bus as `trainbus submit` and the agents write it (jobs queued
with ``runtime.launch.queue.enqueue``, moved with ``JobStore``, a heartbeat put in the agents bucket);
no agent or trainer runs, so every job stays where the test put it. The New run page runs the real
`trainbus submit`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.js.errors
import pandas as pd
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from streamlit.testing.v1 import AppTest

from dashboards.app import connection
from dashboards.app.reader import BusReader
from dashboards.app.views.newrun import LAST
from dashboards.app.views.queue import CANCELS
from runtime.bus.server import RunningServer, start_server
from runtime.launch.jobs import JobStore, moved
from runtime.launch.queue import agents_bucket, enqueue, ensure_queue
from runtime.settings import ServerSettings, StreamSettings
from schemas.jobs import AgentStatus, JobRecord, JobSpec
from schemas.subjects import QUEUE_STREAM
from tests.conftest import REPO, wait_until

MAIN = str(REPO / "dashboards/app/main.py")
CONFIG = "run_name: q\n"
RUNS = {"j-running1": "q-running", "j-low00001": "q-low", "j-normal01": "q-normal", "j-high0001": "q-high"}
"""The recorded jobs and their runs: one running on agent a1, then three waiting, queued in this order."""


def spec(job_id: str, run_id: str, priority: str = "normal") -> JobSpec:
    return JobSpec(job_id=job_id, run_id=run_id, config_name="configs/tiny.yaml", config_yaml=CONFIG,
                   priority=priority, submitted_by="test")  # type: ignore[arg-type]  # fmt: skip


@asynccontextmanager
async def jetstream(url: str, **auth: str) -> AsyncIterator[JetStreamContext]:
    nc = NATS()
    await nc.connect(url, **auth)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _record(url: str) -> None:
    """``RUNS``: the first taken by agent a1 and running, the others waiting."""
    async with jetstream(url) as js:
        await ensure_queue(js, StreamSettings())
        store = await JobStore.open(js)
        for job_id, run_id in RUNS.items():
            await enqueue(js, spec(job_id, run_id, run_id.removeprefix("q-").replace("running", "normal")))
        await store.change("j-running1", lambda r: moved(r, "starting", agent="a1"))
        await store.change("j-running1", lambda r: moved(r, "running", attempt=1))


async def _beat(url: str, **auth: str) -> None:
    """Agent a1's heartbeat (it expires 30 s after it was written)."""
    status = AgentStatus(agent_id="a1", host="gpu-host-1", pid=4242, slots=2, free=1, jobs=["j-running1"],
                         gpus=[0, 1], labels={"gpu": "a100"})  # fmt: skip
    async with jetstream(url, **auth) as js:
        await (await agents_bucket(js)).put("a1", status.model_dump_json().encode())


async def _read(url: str, **auth: str) -> dict[str, JobRecord]:
    async with jetstream(url, **auth) as js:
        return {r.spec.job_id: r for r in await (await JobStore.open(js)).all()}


def jobs(url: str, **auth: str) -> dict[str, JobRecord]:
    return asyncio.run(_read(url, **auth))


async def _in_queue(url: str, seq: int | None) -> bool:
    """Whether the dispatch message ``seq`` is still in the queue for an agent to take."""
    async with jetstream(url) as js:
        try:
            await js.get_msg(QUEUE_STREAM, seq or 0)
        except nats.js.errors.NotFoundError:
            return False
        return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of this module's own holding the recorded queue; no agent ever runs on it."""
    running = start_server(ServerSettings(), tmp_path_factory.mktemp("dashboard-queue"), lock=False)
    try:
        asyncio.run(_record(running.url))
        yield running
    finally:
        connection._shared_reader.clear()  # stops the readers before their server goes
        running.stop()


@pytest.fixture
def reader(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> BusReader:
    """The app's shared reader for this bus, once it holds the recorded jobs and a fresh heartbeat."""
    monkeypatch.setenv("NATS_URL", server.url)
    asyncio.run(_beat(server.url))
    shared = connection._shared_reader(server.url, None)
    wait_until(lambda: len(shared.queue().jobs) >= 4 and shared.queue().agents, what="the dashboard to read the queue")
    return shared


def page(path: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.switch_page(path)
    at.run()
    assert not at.exception, at.exception
    return at


def frame(at: AppTest, *columns: str) -> pd.DataFrame:
    frames = [d.value for d in at.dataframe]
    found = next((f for f in frames if set(columns) <= set(f.columns)), None)
    assert found is not None, [list(f.columns) for f in frames]
    return found


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def button(at: AppTest, label: str) -> Any:
    return next(b for b in at.button if b.label == label)


def cancel(at: AppTest, job_id: str, *, save: bool = True) -> AppTest:
    """Choose ``job_id`` in the cancel form, press Cancel job, and show the server's answer."""
    at.selectbox(key="cancel-job-id").set_value(job_id)
    at.checkbox(key="cancel-save").set_value(save)
    button(at, "Cancel job").click().run()
    future = at.session_state[CANCELS][job_id]
    wait_until(future.done, timeout=30, what="the cancel's answer")
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_queue_page_lists_running_then_waiting_jobs_by_position_and_the_live_agents(reader: BusReader) -> None:
    at = page("views/queue.py")
    table = frame(at, "job", "state", "position")
    waiting = table[table["state"] == "queued"]
    assert table["job"].tolist()[:4] == ["j-running1", "j-high0001", "j-normal01", "j-low00001"]
    assert waiting["position"].tolist() == [1, 2, 3]  # high, then normal, then low, whatever the submission order
    assert table.loc[0, ["state", "agent"]].tolist() == ["running", "a1"] and pd.isna(table.loc[0, "position"])
    assert (table["run"] == "run?run=" + table["job"].map(RUNS)).all()  # each run links to its page
    agents = frame(at, "agent", "free")
    assert agents.iloc[0][["agent", "host", "slots", "free", "jobs", "labels"]].tolist() == [
        "a1", "gpu-host-1", 2, 1, "j-running1", "gpu=a100"
    ]  # fmt: skip


def test_an_operator_cancels_a_waiting_job_and_asks_the_agent_to_stop_a_running_one(
    reader: BusReader, server: RunningServer
) -> None:
    at = cancel(page("views/queue.py"), "j-low00001")
    assert "cancel j-low00001: cancelled" in texts(at.success)
    low = jobs(server.url)["j-low00001"]
    assert (low.state, low.reason) == ("cancelled", "cancelled while waiting")
    assert not asyncio.run(_in_queue(server.url, low.queue_seq))  # no agent will ever get it

    at = cancel(at, "j-running1", save=False)
    assert "cancel j-running1: its agent a1 is stopping it" in texts(at.success)
    running = jobs(server.url)["j-running1"]
    assert (running.state, running.cancel) == ("running", "no-save")  # the agent stops it, without saving
    wait_until(lambda: next(r for r in reader.queue().jobs if r.spec.job_id == "j-low00001").final, what="the reader")
    assert "j-low00001" not in at.run().selectbox(key="cancel-job-id").options  # a finished job is not offered


def test_a_viewer_sees_the_queue_and_is_told_cancelling_needs_the_operator_role(
    secured_server: RunningServer, role_passwords: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = secured_server.url
    admin = {"user": "admin", "password": role_passwords["admin"]}

    async def record() -> None:
        async with jetstream(url, **admin) as js:
            await ensure_queue(js, StreamSettings())
            # the record alone, without a dispatch message: no agent of another test could take it
            await (await JobStore.open(js)).create(spec("j-viewer01", "q-viewer"))

    asyncio.run(record())
    asyncio.run(_beat(url, **admin))
    monkeypatch.setenv("NATS_URL", url)
    monkeypatch.setenv("NATS_USER", "viewer")
    monkeypatch.setenv("NATS_PASSWORD", role_passwords["viewer"])
    shared = connection._shared_reader(url, "viewer")
    try:
        wait_until(lambda: any(r.spec.job_id == "j-viewer01" for r in shared.queue().jobs), what="the viewer's queue")
        at = cancel(page("views/queue.py"), "j-viewer01")
        assert "j-viewer01" in frame(at, "job", "state")["job"].tolist()
        errors = texts(at.error)
        assert any(
            e.startswith("cancel j-viewer01: not allowed: the server denied viewer") and "operator role" in e
            for e in errors
        ), errors
        assert not at.success
        assert jobs(url, **admin)["j-viewer01"].state == "queued"  # nothing changed
    finally:
        shared.close()


def test_new_run_shows_a_config_mistake_before_anything_is_queued(reader: BusReader, server: RunningServer) -> None:
    at = page("views/newrun.py")
    assert at.selectbox(key="newrun-config").value == "configs/tiny.yaml"  # the shipped configs, tiny first
    at.text_area(key="newrun-overrides").input("training.max_stepz=40")
    at.text_input(key="newrun-run-id").input("typo-run")
    button(at, "Submit").click().run()
    assert not at.exception, at.exception
    errors = texts(at.error)
    assert any(e.startswith("Not queued: ") and "training.max_stepz" in e and "max_steps" in e for e in errors), errors
    assert not at.success and not at.page_link
    assert not [r for r in jobs(server.url).values() if r.spec.run_id == "typo-run"]


def test_new_run_queues_the_picked_config_with_its_overrides_and_links_to_the_run(
    reader: BusReader, server: RunningServer
) -> None:
    at = page("views/newrun.py")
    at.selectbox(key="newrun-config").set_value("configs/tiny.yaml")
    at.text_area(key="newrun-overrides").input("# a comment\ntraining.max_steps=40\n\ntraining.learning_rate=1e-3")
    at.text_input(key="newrun-run-id").input("from-the-page")
    at.radio(key="newrun-priority").set_value("high")
    button(at, "Submit").click().run()
    assert not at.exception, at.exception
    result = at.session_state[LAST]
    assert result.ok, result.message
    assert texts(at.success) == [f"Queued job {result.job_id} for run from-the-page."]
    (link,) = at.page_link
    assert (link.proto.page, link.proto.query_string) == ("run", "run=from-the-page")  # the Run page of the run
    job = jobs(server.url)[result.job_id]
    assert (job.state, job.spec.run_id, job.spec.priority) == ("queued", "from-the-page", "high")
    assert job.spec.overrides == ["training.max_steps=40", "training.learning_rate=1e-3"]
    assert job.spec.config_yaml == (REPO / "configs/tiny.yaml").read_text()
    wait_until(lambda: any(r.spec.job_id == result.job_id for r in reader.queue().jobs), what="the Queue page's reader")
    assert os.environ["NATS_URL"] == server.url  # the page queued on the dashboard's own bus
