"""`trainbus agent`: pulls jobs from the launch queue when it has the slots, and trains them.

Every ``TICK_SECONDS`` the agent looks at its trainers, and with free slots asks the queue for
work, higher priority first (``runtime.launch.queue``: one work-queue consumer per priority, shared
by every agent). It keeps each job's message while the job runs and renews it every
``RENEW_SECONDS`` together with its heartbeat; if the agent dies, JetStream hands the job to
another agent after ``LEASE_SECONDS``, which resumes the run from its latest checkpoint as the next
attempt (up to the job's ``max_restarts``). The trainer it left behind stops itself when it learns
that (``producers.run.fencing``).

SIGTERM or SIGINT (and `trainbus agent --drain`) drain the agent: it takes no more jobs and exits
when its running ones end; a second signal, or ``--drain --requeue``, checkpoints them and hands
them back to the queue for another agent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from consumers.control_client import build_command, send_command
from consumers.launch.slots import Slots
from consumers.launch.trainer import Trainer, config_file, outcome, thread_share, train_argv, trainer_env
from runtime.errors import NotFound, TrainbusError
from runtime.launch.jobs import Change, Conflict, JobStore, moved
from runtime.launch.queue import RENEW_SECONDS, agents_bucket
from runtime.logs import get_logger
from schemas import EVENTS_STREAM, Event, RunFinished, event_subject, parse_event
from schemas.common import utc_now
from schemas.jobs import PRIORITIES, AgentStatus, JobRecord, JobSpec, JobStateName
from schemas.subjects import QUEUE_STREAM, agent_subject, dispatch_consumer

BUS_TROUBLE = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)
"""What a round of the loop survives: the next round tries again."""
TICK_SECONDS = 1.0
FETCH_SECONDS = 0.25
"""How long one ask of the queue waits for a job."""
LEAVE_DELAY_SECONDS = 5.0
"""A job this agent can never run goes back to the queue for this long, so others see it first."""


@dataclass
class Running:
    """A job this agent is running."""

    record: JobRecord
    msg: Msg
    trainer: Trainer
    gpus: list[int]
    started: bool = False
    """Its trainer published ``run.started`` for this attempt."""
    stop_sent: bool = False
    requeue: bool = False


@dataclass
class Options:
    """How an agent runs (from `trainbus agent`'s arguments)."""

    agent_id: str
    slots: Slots
    workdir: Path
    servers: str
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)


class Agent:
    """One agent: its slots, its running jobs, and its loop."""

    def __init__(self, nc: NATS, js: JetStreamContext, store: JobStore, agents: KeyValue, options: Options) -> None:
        self.nc, self.js, self.store, self.agents, self.o = nc, js, store, agents, options
        self.slots = options.slots
        self.running: dict[str, Running] = {}
        self.draining = False
        self.requeue = False
        self.log = get_logger(component="agent", agent=options.agent_id)
        self._pulls: dict[str, JetStreamContext.PullSubscription] = {}
        self._next_renew = 0.0
        self.started_at = utc_now()

    @classmethod
    async def open(cls, nc: NATS, options: Options) -> Agent:
        js = nc.jetstream()
        agent = cls(nc, js, await JobStore.open(js), await agents_bucket(js), options)
        agent._pulls = {p: await js.pull_subscribe_bind(dispatch_consumer(p), QUEUE_STREAM) for p in PRIORITIES}
        await nc.subscribe(agent_subject(options.agent_id), cb=agent._on_request)
        return agent

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Until drained: look after the running jobs, renew, and take work when slots are free."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        self.log.info("agent ready", slots=self.slots.total, gpus=self.slots.gpus, labels=self.slots.labels)
        while not (self.draining and not self.running):
            await self._tick()
            await asyncio.sleep(TICK_SECONDS)
        await self.agents.delete(self.o.agent_id)
        self.log.info("agent drained; exiting")

    async def _tick(self) -> None:
        """One round; the bus being away (or slow) costs this round only: trainers go on meanwhile."""
        try:
            await self._look_after()
            await self._renew()
            if not self.draining:
                await self._fill()
        except BUS_TROUBLE as exc:
            self.log.warning("bus trouble; trying again", error=f"{type(exc).__name__}: {exc}")

    def _on_signal(self) -> None:
        if self.draining:
            self.drain(requeue=True)
        else:
            self.drain(requeue=False)

    def drain(self, *, requeue: bool) -> None:
        """Take no more jobs; with ``requeue`` checkpoint the running ones and hand them back."""
        self.draining = True
        self.requeue = self.requeue or requeue
        self.log.warning("draining", running=len(self.running), requeue=self.requeue)
        for job in self.running.values():
            job.requeue = self.requeue

    async def _on_request(self, msg: Msg) -> None:
        requeue = msg.data.strip() == b"requeue"
        self.drain(requeue=requeue)
        await msg.respond(f"draining {self.o.agent_id}: {len(self.running)} running".encode())

    # ---- taking jobs -------------------------------------------------------------------------

    async def _fill(self) -> None:
        """Ask the queue for jobs while slots are free: high priority first, then normal, then low."""
        for priority in PRIORITIES:
            while self.slots.free > 0:
                msg = await self._fetch(priority)
                if msg is None:
                    break
                if await self._consider(msg) == "wait":
                    return  # hold the line: nothing of lower priority jumps ahead of it here

    async def _fetch(self, priority: str) -> Msg | None:
        try:
            msgs = await self._pulls[priority].fetch(1, timeout=FETCH_SECONDS)
        except (TimeoutError, nats.errors.TimeoutError):
            return None
        return msgs[0] if msgs else None

    async def _consider(self, msg: Msg) -> str:
        """Take, hold or leave the job in ``msg``."""
        try:
            spec = JobSpec.model_validate_json(msg.data)
        except ValidationError as exc:  # not a job this trainbus can read: it would come back forever
            self.log.error("unreadable job in the queue; dropping it", seq=msg.metadata.sequence.stream, error=str(exc))
            await msg.term()
            return "done"
        record = await self._record_of(spec, msg)
        if record.final:
            await msg.ack()
            return "done"
        if spec.job_id in self.running:  # our own, delivered again after the bus was away
            self.running[spec.job_id].msg = msg
            await msg.in_progress()
            return "take"
        decision = self.slots.decide(spec)
        if decision != "take":
            await msg.nak(delay=LEAVE_DELAY_SECONDS if decision == "leave" else None)
            return decision
        await self._claim(msg, record)
        return "take"

    async def _record_of(self, spec: JobSpec, msg: Msg) -> JobRecord:
        """The job's record; written here when its submitter died before writing it."""
        try:
            return (await self.store.get(spec.job_id)).record
        except NotFound:
            try:
                return await self.store.create(spec, queue_seq=msg.metadata.sequence.stream)
            except Conflict:
                return (await self.store.get(spec.job_id)).record

    async def _claim(self, msg: Msg, seen: JobRecord) -> None:
        if seen.cancel is not None:
            why = "cancelled before it started"
            await self.store.change(seen.spec.job_id, lambda r: moved(r, "cancelled", reason=why))
            await msg.ack()
            return
        try:
            record = await self._take_over(seen)
        except Conflict as exc:
            self.log.info("job changed while claiming it; leaving it", job=seen.spec.job_id, why=str(exc))
            await msg.nak()
            return
        if record.state == "failed":
            await msg.ack()
            return
        self._start(msg, record)

    async def _take_over(self, seen: JobRecord) -> JobRecord:
        """Claim the job: a job whose agent was lost counts a restart, past ``max_restarts`` it fails."""
        me = self.o.agent_id
        lost = seen.state in ("starting", "running") and seen.agent != me
        job_id = seen.spec.job_id
        if lost:
            restarts = seen.restarts + 1
            if restarts > seen.spec.max_restarts:
                why = f"its agent was lost {restarts} times (max_restarts {seen.spec.max_restarts})"
                return await self.store.change(job_id, _expect(seen, lambda r: moved(r, "failed", reason=why)))
            why = f"agent {seen.agent} was lost; resuming the run elsewhere"
            requeued = _expect(seen, lambda r: moved(r, "requeued", reason=why, restarts=restarts))
            seen = await self.store.change(job_id, requeued)
        gpus = self.slots.hold(job_id, seen.spec.slots)
        try:
            return await self.store.change(
                job_id, _expect(seen, lambda r: moved(r, "starting", agent=me, gpus=gpus, reason=""))
            )
        except BaseException:
            self.slots.release(job_id)
            raise

    def _start(self, msg: Msg, record: JobRecord) -> None:
        spec = record.spec
        folder = self.o.workdir / spec.job_id
        folder.mkdir(parents=True, exist_ok=True)
        config = config_file(spec, folder)
        own = "OMP_NUM_THREADS" in self.o.environ  # the user's own setting wins
        threads = None if own else thread_share(self.o.cpus, spec.slots, self.slots.total, bool(self.slots.gpus))
        env = trainer_env(self.o.environ, servers=self.o.servers, job_id=spec.job_id, agent_id=self.o.agent_id,
                          gpus=record.gpus, threads=threads)  # fmt: skip
        trainer = Trainer.start(train_argv(spec, config, resume=record.attempt >= 1), env, folder / "train.log")
        self.running[spec.job_id] = Running(record, msg, trainer, record.gpus, requeue=self.requeue)
        self.log.info("job started", job=spec.job_id, run=spec.run_id, attempt=record.attempt + 1, gpus=record.gpus)

    # ---- running jobs ------------------------------------------------------------------------

    async def _look_after(self) -> None:
        for job_id, job in list(self.running.items()):
            code = job.trainer.exit_code()
            if code is not None:
                await self._finished(job_id, job, code)
            elif not job.started:
                await self._check_started(job_id, job)

    async def _check_started(self, job_id: str, job: Running) -> None:
        """The job is running once its trainer published ``run.started`` of a new attempt."""
        started = await self._last(job.record.spec.run_id, "run.started")
        if started is None or started.attempt <= job.record.attempt:
            return
        job.started = True
        job.record = await self.store.change(job_id, lambda r: moved(r, "running", attempt=started.attempt))

    async def _finished(self, job_id: str, job: Running, code: int) -> None:
        """Record how the job ended, then free its slots (bus trouble: the next round tries again)."""
        try:
            record = (await self.store.get(job_id)).record
        except NotFound:
            record = None
        if record is not None and record.agent == self.o.agent_id and not record.final:
            state, reason = await self._outcome(job, record, code)
            await self.store.change(job_id, lambda r: moved(r, state, reason=reason, exit_code=code))
            await (job.msg.nak() if state == "requeued" else job.msg.ack())
            self.log.info("job ended", job=job_id, state=state, reason=reason)
        else:
            self.log.warning("job no longer ours; leaving its record alone", job=job_id)
        self.slots.release(job_id)
        del self.running[job_id]

    async def _outcome(self, job: Running, record: JobRecord, code: int) -> tuple[JobStateName, str]:
        if record.cancel is not None:
            return "cancelled", f"cancelled ({'saved first' if record.cancel == 'save' else 'not saved'})"
        if code != 0:
            return outcome(code, job.trainer.error_line())
        finished = await self._last(record.spec.run_id, "run.finished")
        if not isinstance(finished, RunFinished):
            return "failed", "the trainer exited without saying how the run ended"
        if finished.status == "stopped" and job.requeue:
            return (
                "requeued",
                f"agent {self.o.agent_id} drained; handed back after a checkpoint at step {finished.step}",
            )
        return finished.status, finished.reason

    async def _last(self, run_id: str, kind: str) -> Event | None:
        try:
            msg = await self.js.get_last_msg(EVENTS_STREAM, event_subject(run_id, kind))
            return parse_event(msg.data or b"")
        except (nats.js.errors.NotFoundError, ValueError):
            return None

    # ---- renewing ----------------------------------------------------------------------------

    async def _renew(self) -> None:
        """Every ``RENEW_SECONDS``: keep each job's message, act on cancels and drains, and beat."""
        if time.monotonic() < self._next_renew:
            return
        self._next_renew = time.monotonic() + RENEW_SECONDS
        for job_id, job in list(self.running.items()):
            try:
                await job.msg.in_progress()
            except Exception as exc:  # the bus is away: the lease may lapse; the next tick tries again
                self.log.warning("could not renew a job", job=job_id, error=str(exc))
            await self._follow_record(job_id, job)
        await self._beat()

    async def _follow_record(self, job_id: str, job: Running) -> None:
        """Act on what others wrote in the job's record: a cancel, or another agent taking it over."""
        try:
            record = (await self.store.get(job_id)).record
        except Exception:  # the bus is away: nothing to learn now
            return
        if record.agent != self.o.agent_id:  # our lease lapsed and the job went on elsewhere
            self.log.warning("job taken over by another agent; stopping our trainer", job=job_id, now=record.agent)
            job.trainer.signal(signal.SIGKILL)
            job.stop_sent = True
            return
        save = (record.cancel == "save") if record.cancel is not None else (True if job.requeue else None)
        if save is not None and not job.stop_sent:
            job.stop_sent = True
            await self._stop(job, save=save, why="cancelled" if record.cancel else "agent draining")

    async def _stop(self, job: Running, *, save: bool, why: str) -> None:
        """Stop a job's trainer as `trainbus ctl stop` would; one not yet listening gets a signal."""
        run_id = job.record.spec.run_id
        command = build_command("stop", run_id, issued_by=f"agent:{self.o.agent_id}", reason=why, save=save)
        try:
            await send_command(self.nc, command, timeout=5.0)
        except TrainbusError:
            # SIGTERM makes `trainbus train` save and stop; before its first step nothing is lost by SIGKILL
            job.trainer.signal(signal.SIGTERM if save else signal.SIGKILL)
        self.log.info("stopping a job", job=job.record.spec.job_id, run=run_id, save=save, why=why)

    async def _beat(self) -> None:
        status = AgentStatus(
            agent_id=self.o.agent_id, host=socket.gethostname(), pid=os.getpid(), slots=self.slots.total,
            free=self.slots.free, jobs=sorted(self.running), gpus=self.slots.gpus, labels=self.slots.labels,
            draining=self.draining, started_at=self.started_at,
        )  # fmt: skip
        try:
            await self.agents.put(self.o.agent_id, status.model_dump_json().encode())
        except Exception as exc:
            self.log.warning("could not write the heartbeat", error=str(exc))


def _expect(seen: JobRecord, change: Change) -> Change:
    """``change``, refused (``Conflict``) when another writer moved the job since ``seen``."""

    def guarded(record: JobRecord) -> JobRecord:
        if record.transitions != seen.transitions:
            raise Conflict(f"job {record.spec.job_id} is {record.state} now")
        return change(record)

    return guarded
