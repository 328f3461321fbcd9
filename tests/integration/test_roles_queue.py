"""configs/nats/roles.conf and the launch queue, enforced by a real nats-server: who may submit,
cancel, pull and see jobs, who may put and fetch checkpoint files, what a launched trainer hears
to fence itself, and that only `trainbus up` (admin) creates the queue and the checkpoint files.

Each permission is proven by the JetStream call the command makes (no training runs); a refused
one by the server's permission error, and by what did not happen."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from producers.run.fencing import Fence
from runtime.bus.connect import BusTarget, round_trip
from runtime.bus.objects import checkpoint_store, existing_store, fetch, object_name, stored, upload
from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream
from runtime.checkpoints import fingerprint
from runtime.cli.queue import live_agents
from runtime.cli.up import provision
from runtime.errors import BusUnavailable
from runtime.launch.jobs import JobStore, moved
from runtime.launch.queue import agents_bucket, cancel, enqueue, ensure_queue
from runtime.settings import ServerSettings, Settings
from schemas import EVENTS_STREAM, Hyperparameters, JobState, RunStarted, event_subject, parse_event
from schemas.jobs import AgentStatus, JobRecord, JobSpec
from schemas.subjects import QUEUE_STREAM, agent_subject, dispatch_consumer
from tests.conftest import REPO
from tests.integration.test_roles import TIMEOUT, delivered, denied, eventually, login

STREAM = Settings().stream
OBJECTS = "$O.TRAINBUS_CHECKPOINT_FILES"


@dataclass
class User:
    """A connection as one role, and the permission errors the server sent it."""

    nc: NATS
    denials: list[str] = field(default_factory=list)

    async def refused(self, subject: str, payload: bytes = b"{}") -> None:
        """The server refuses ``subject`` to this user (a JetStream API call is refused the same way:
        its request never reaches JetStream)."""
        await self.nc.publish(subject, payload)
        await self.nc.flush()
        assert await eventually(lambda: any(subject.lower() in d.lower() for d in self.denials)), (
            f"no permission error for {subject}"
        )

    async def cannot_subscribe(self, subject: str) -> None:
        await self.nc.subscribe(subject)
        await self.nc.flush()
        assert await eventually(
            lambda: any(f'subscription to "{subject.lower()}"' in d.lower() for d in self.denials)
        ), (  # fmt: skip
            f"no permission error subscribing to {subject}"
        )


@pytest.fixture
async def users(
    secured_server: RunningServer, role_passwords: dict[str, str], provisioned: None
) -> AsyncIterator[dict[str, User]]:
    """A connection as each role to the session's secured server, as `trainbus up` provisioned it."""
    conns: dict[str, User] = {}
    for role in role_passwords:
        user = User(NATS())
        user.nc = await login(secured_server, role, role_passwords[role], user.denials)
        conns[role] = user
    yield conns
    for user in conns.values():
        await user.nc.close()


@pytest.fixture
async def provisioned(
    secured_server: RunningServer, role_passwords: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's secured server as `trainbus up` leaves it (provisioning is idempotent)."""
    monkeypatch.setenv("TRAINBUS_ADMIN_PASSWORD", role_passwords["admin"])
    await provision(BusTarget([secured_server.url], "test"), Settings(), cluster=False)


def job(run_id: str) -> JobSpec:
    return JobSpec(
        job_id=f"j-{uuid.uuid4().hex[:10]}", run_id=run_id, config_name="configs/tiny.yaml", config_yaml="run_name: x\n"
    )


def beat(agent_id: str) -> bytes:
    return AgentStatus(agent_id=agent_id, host="h", pid=1, slots=1, free=1).model_dump_json().encode()


def started(run_id: str, attempt: int) -> bytes:
    event = RunStarted(
        event_id=f"{run_id}.{attempt}.1", run_id=run_id, attempt=attempt, seq=1, config={}, config_hash="h",
        model="tiny", adapter="lora", data_fingerprint="d", hyperparameters=Hyperparameters(learning_rate=0.003),
        host="host-b",
    )  # fmt: skip
    return event.model_dump_json().encode()


async def take(agent: NATS, job_id: str) -> Msg:
    """The dispatch message of ``job_id``, pulled as an agent does (others are handed back at once)."""
    pull = await agent.jetstream().pull_subscribe_bind(dispatch_consumer("normal"), QUEUE_STREAM)
    for _ in range(20):
        for msg in await pull.fetch(1, timeout=TIMEOUT):
            if JobSpec.model_validate_json(msg.data).job_id == job_id:
                return msg
            await msg.nak()
    raise AssertionError(f"job {job_id} never came out of the queue")


async def record(admin: NATS, job_id: str) -> JobRecord:
    return (await (await JobStore.open(admin.jetstream())).get(job_id)).record


def checkpoint(folder: Path, size: int = 3000) -> tuple[Path, str]:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (folder / "trainer_state.json").write_text('{"global_step": 10}')
    return folder, fingerprint(folder)[0]


async def test_an_agent_pulls_claims_beats_reports_and_stops_but_may_not_submit_or_publish_run_events(
    users: dict[str, User],
) -> None:
    admin, operator, agent = users["admin"].nc, users["operator"].nc, users["agent"]
    await ensure_queue(agent.nc.jetstream(), STREAM)  # it only looks: everything exists
    spec = job("roles-agent")
    await enqueue(operator.jetstream(), spec)

    msg = await take(agent.nc, spec.job_id)
    await msg.in_progress()  # its lease, renewed
    store = await JobStore.open(agent.nc.jetstream())
    claimed = await store.change(spec.job_id, lambda r: moved(r, "starting", agent="a-roles"))
    heartbeats = await agents_bucket(agent.nc.jetstream())
    await heartbeats.put("a-roles", beat("a-roles"))
    assert await delivered(admin, "trainbus.control.roles-agent", agent.nc, b"stop") == b"stop"  # cancel, drain

    async def answer(request: Msg) -> None:
        await request.respond(b"draining a-roles")

    await agent.nc.subscribe(agent_subject("a-roles"), cb=answer)
    await round_trip(agent.nc)  # subscribed at the server before the operator asks
    assert (await operator.request(agent_subject("a-roles"), b"drain", timeout=TIMEOUT)).data == b"draining a-roles"
    await msg.ack_sync()
    await heartbeats.delete("a-roles")  # drained: it leaves the bucket

    assert (await record(admin, spec.job_id)).agent == "a-roles"
    last = parse_event((await admin.jetstream().get_last_msg(EVENTS_STREAM, event_subject("roles-agent", "job.state"))).data)  # fmt: skip
    assert isinstance(last, JobState) and (last.state, last.seq) == ("starting", claimed.transitions)
    with pytest.raises(nats.js.errors.NotFoundError):  # acknowledged: it left the work queue
        await admin.jetstream().get_msg(QUEUE_STREAM, msg.metadata.sequence.stream)
    assert agent.denials == []

    await denied(admin, "trainbus.events.roles-agent.train.step", agent.nc, b"{}", agent.denials)
    await denied(admin, "trainbus.jobs.queue.normal", agent.nc, b"{}", agent.denials)  # submit
    await agent.refused(f"$JS.API.STREAM.MSG.DELETE.{QUEUE_STREAM}")  # cancel a waiting job
    await agent.refused(f"$JS.API.STREAM.CREATE.{QUEUE_STREAM}")  # provision
    await agent.refused(f"$JS.API.CONSUMER.DURABLE.CREATE.{QUEUE_STREAM}.mine")
    await agent.refused(f"{OBJECTS}.C.x")  # checkpoint files are its trainers' to put


async def test_an_operator_submits_cancels_and_reads_the_queue_but_may_not_take_jobs_or_beat(
    users: dict[str, User],
) -> None:
    admin, operator = users["admin"].nc, users["operator"]
    await ensure_queue(operator.nc.jetstream(), STREAM)
    spec = job("roles-operator")
    queued = await enqueue(operator.nc.jetstream(), spec)
    await (await agents_bucket(admin.jetstream())).put("a-operator", beat("a-operator"))
    assert spec.job_id in {r.spec.job_id for r in await (await JobStore.open(operator.nc.jetstream())).all()}
    assert "a-operator" in {a.agent_id for a in await live_agents(operator.nc.jetstream())}

    cancelled = await cancel(operator.nc.jetstream(), spec.job_id, save=True)
    assert cancelled.state == "cancelled" and (await record(admin, spec.job_id)).state == "cancelled"
    with pytest.raises(nats.js.errors.NotFoundError):  # its message left the queue: no agent gets it
        await admin.jetstream().get_msg(QUEUE_STREAM, queued.queue_seq)
    assert operator.denials == []

    await operator.refused(f"$JS.API.CONSUMER.MSG.NEXT.{QUEUE_STREAM}.{dispatch_consumer('normal')}")
    await operator.refused("$KV.TRAINBUS_AGENTS.a-operator", beat("a-operator"))
    await operator.refused(f"$JS.API.STREAM.CREATE.{QUEUE_STREAM}")
    await denied(admin, "trainbus.events.roles-operator.train.step", operator.nc, b"{}", operator.denials)
    await operator.refused(f"{OBJECTS}.C.x")


async def test_a_viewer_sees_the_queue_and_the_agents_but_may_not_submit_or_cancel(users: dict[str, User]) -> None:
    admin, operator, viewer = users["admin"].nc, users["operator"].nc, users["viewer"]
    spec = job("roles-viewer")
    queued = await enqueue(operator.jetstream(), spec)
    await (await agents_bucket(admin.jetstream())).put("a-viewer", beat("a-viewer"))
    seen = {r.spec.job_id: r for r in await (await JobStore.open(viewer.nc.jetstream())).all()}
    assert seen[spec.job_id].state == "queued"
    assert "a-viewer" in {a.agent_id for a in await live_agents(viewer.nc.jetstream())}
    assert viewer.denials == []

    await denied(admin, "trainbus.jobs.queue.normal", viewer.nc, job("roles-viewer-2").model_dump_json().encode(), viewer.denials)  # fmt: skip
    changed = moved(queued, "cancelled").model_dump_json().encode()
    await viewer.refused(f"$KV.TRAINBUS_JOBS.{spec.job_id}", changed)
    await viewer.refused(f"$JS.API.STREAM.MSG.DELETE.{QUEUE_STREAM}", json.dumps({"seq": queued.queue_seq}).encode())
    await denied(admin, "trainbus.events.roles-viewer.job.state", viewer.nc, b"{}", viewer.denials)
    await viewer.refused(f"$JS.API.CONSUMER.MSG.NEXT.{QUEUE_STREAM}.{dispatch_consumer('normal')}")
    assert (await record(admin, spec.job_id)).state == "queued"  # nothing the viewer sent took effect
    assert (await admin.jetstream().get_msg(QUEUE_STREAM, queued.queue_seq)).data
    await cancel(admin.jetstream(), spec.job_id, save=False)


async def test_a_trainer_puts_and_fetches_checkpoint_files_and_hears_what_fences_it(
    users: dict[str, User], tmp_path: Path
) -> None:
    admin, agent, trainer = users["admin"].nc, users["agent"].nc, users["trainer"]
    folder, sha = checkpoint(tmp_path / "a" / "checkpoint-10")
    obs = await checkpoint_store(trainer.nc.jetstream(), STREAM.objects_max_bytes)  # it only looks: `up` made it
    await upload(obs, folder, "roles-trainer", 10, sha)
    there = await fetch(await existing_store(trainer.nc.jetstream()), "roles-trainer", 10, sha, tmp_path / "b" / "checkpoint-10")  # fmt: skip
    assert fingerprint(there)[0] == sha  # --resume on another machine

    stops: list[str] = []
    fence = Fence("roles-trainer", "a-fence", attempt=lambda: 1, stop=stops.append, connected=lambda: True)
    heard: list[str] = []

    async def hear(msg: Msg) -> None:  # as the run's publisher process listens
        heard.append(msg.subject)
        fence.listeners()[msg.subject](msg.data)

    for subject in fence.listeners():
        await trainer.nc.subscribe(subject, cb=hear)
    await round_trip(trainer.nc)
    await (await agents_bucket(agent.jetstream())).put("a-fence", beat("a-fence"))
    assert await eventually(lambda: "$KV.TRAINBUS_AGENTS.a-fence" in heard), "the trainer never heard its agent beat"
    await admin.publish(event_subject("roles-trainer", "run.started"), started("roles-trainer", 2))
    assert await eventually(lambda: bool(stops)), "the trainer never heard that a later attempt started"
    assert stops == ["fenced: attempt 2 of run roles-trainer started on host-b"]
    assert trainer.denials == []

    await trainer.refused("$JS.API.STREAM.PURGE.OBJ_TRAINBUS_CHECKPOINT_FILES")  # a checkpoint, once up, stays
    assert (await stored(obs, "roles-trainer", 10)) is not None
    await trainer.cannot_subscribe("trainbus.events.roles-trainer.train.step")
    await denied(admin, "trainbus.events.roles-trainer.job.state", trainer.nc, b"{}", trainer.denials)
    await trainer.refused(f"$JS.API.CONSUMER.MSG.NEXT.{QUEUE_STREAM}.{dispatch_consumer('normal')}")
    await trainer.refused("$KV.TRAINBUS_JOBS.j-roles0")


async def test_a_predictor_fetches_checkpoint_files_but_may_not_put_them(
    users: dict[str, User], tmp_path: Path
) -> None:
    trainer, predictor, viewer = users["trainer"].nc, users["predictor"], users["viewer"]
    folder, sha = checkpoint(tmp_path / "a" / "checkpoint-20")
    await upload(await existing_store(trainer.jetstream()), folder, "roles-predictor", 20, sha)
    obs = await existing_store(predictor.nc.jetstream())
    there = await fetch(obs, "roles-predictor", 20, sha, tmp_path / "serve" / "checkpoint-20")  # trainbus serve
    assert fingerprint(there)[0] == sha and predictor.denials == []
    await predictor.refused(f"{OBJECTS}.C.x")
    await predictor.refused(f"{OBJECTS}.M.{object_name('roles-predictor', 30)}")
    await viewer.refused(f"{OBJECTS}.C.x")


@pytest.fixture
def bare_server(tmp_path: Path, role_passwords: dict[str, str]) -> Iterator[RunningServer]:
    """A server with the roles config that no `trainbus up` provisioned."""
    env = {f"TRAINBUS_{name.upper()}_PASSWORD": password for name, password in role_passwords.items()}
    os.environ.update(env)
    try:
        server = start_server(ServerSettings(config_file=str(REPO / "configs/nats/roles.conf")), tmp_path / "nats", lock=False)  # fmt: skip
    finally:
        for name in env:
            os.environ.pop(name, None)
    yield server
    server.stop()


async def test_only_up_creates_the_queue_and_the_checkpoint_files_and_others_say_what_is_missing(
    bare_server: RunningServer, role_passwords: dict[str, str], tmp_path: Path
) -> None:
    admin = await login(bare_server, "admin", role_passwords["admin"])
    await ensure_stream(admin.jetstream(), STREAM)  # runs were trained here; the queue was never provisioned
    env = {"NATS_URL": bare_server.url, "NATS_USER": "agent", "NATS_PASSWORD": role_passwords["agent"], "PATH": "/usr/bin:/bin"}  # fmt: skip
    agent = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime.cli", "agent"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert agent.returncode == 3, agent.stderr
    said = [line for line in agent.stderr.splitlines() if line.startswith("trainbus agent:")]
    assert said == [
        "trainbus agent: the launch queue is not provisioned (stream TRAINBUS_QUEUE, consumer dispatch-high, "
        "consumer dispatch-normal, consumer dispatch-low, bucket TRAINBUS_JOBS, bucket TRAINBUS_AGENTS missing) "
        "and JetStream did not answer creating the stream TRAINBUS_QUEUE: this user may not create it; "
        "`trainbus up` provisions its bus as admin, `trainbus provision` (as admin) a bus you run yourself"
    ]
    trainer = await login(bare_server, "trainer", role_passwords["trainer"])
    with pytest.raises(BusUnavailable, match=r"^TRAINBUS_CHECKPOINT_FILES does not exist .* may not create it; `trainbus up` provisions"):  # fmt: skip
        await checkpoint_store(trainer.jetstream(timeout=2), STREAM.objects_max_bytes)
    with pytest.raises(nats.js.errors.NotFoundError):  # neither was created behind up's back
        await admin.jetstream().stream_info(QUEUE_STREAM)
    with pytest.raises(nats.js.errors.NotFoundError):
        await admin.jetstream().object_store("TRAINBUS_CHECKPOINT_FILES")

    admin_env = {**env, "NATS_USER": "admin", "NATS_PASSWORD": role_passwords["admin"]}
    provisioned = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime.cli", "provision"], cwd=tmp_path, env=admin_env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert provisioned.returncode == 0, provisioned.stderr
    assert provisioned.stdout == (
        f"trainbus: provisioned {bare_server.url}: the events stream, the checkpoint bucket, the launch queue and "
        "the checkpoint files, with 1 replica\n"
    )
    denials: list[str] = []
    agent_nc = await login(bare_server, "agent", role_passwords["agent"], denials)
    await ensure_queue(agent_nc.jetstream(), STREAM)
    await checkpoint_store(trainer.jetstream(), STREAM.objects_max_bytes)
    assert denials == []
    for conn in (admin, trainer, agent_nc):
        await conn.close()
