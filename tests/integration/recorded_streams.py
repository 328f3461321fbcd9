"""Recorded event streams of runs whose lifecycle the readers once told apart, for the test that
replays them through `trainbus runs`, the exporter and the dashboard.

Each builder returns a ``Stream``: the events a trainer (and the audit gate, the sweep driver,
a user) publish, in publish order, with the times they would carry at ``now``, and what every
reader must show at ``now``. ``publish`` stores them on JetStream as the publisher does (one
``Nats-Msg-Id`` per event).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import nats

from runtime.bus.stream import ensure_stream
from runtime.publish.sinks import MemorySink, Stamper
from runtime.settings import StreamSettings
from schemas import (
    AuditFlag,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    Heartbeat,
    RunFinished,
    RunStarted,
    RunState,
    RunTag,
    SweepTag,
    TrainStep,
    event_subject,
)

HP = {"learning_rate": 3e-3, "max_grad_norm": 1.0, "weight_decay": 0.0, "eval_steps": 100, "save_steps": 100}


@dataclass
class Stream:
    """One run's recorded events and what the readers must agree it is."""

    run_id: str
    events: list[Event]
    state: str
    step: int
    attempt: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """Live values the readers must show (only those named)."""
    trainer_silent_for: float | None = None
    """Seconds since the trainer's newest event at ``now`` (what LAST_EVENT shows)."""


class Clock:
    """Event times: ``at(seconds_before_now)``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def at(self, before: float) -> datetime:
        return self.now - timedelta(seconds=before)


def _started(trainer: Stamper, when: datetime, **fields: Any) -> Event:
    return trainer.emit(
        RunStarted, config={"training": {"max_steps": 100}}, config_hash="h", model="tiny", adapter="lora",
        data_fingerprint="d", hyperparameters=HP, max_steps=100, time=when, **fields,
    )  # fmt: skip


def _step(trainer: Stamper, step: int, when: datetime, **fields: Any) -> Event:
    return trainer.emit(
        TrainStep, step=step, epoch=step / 100, loss=2.0 / step, learning_rate=3e-3 * (1 - step / 100), time=when,
        hyperparameters=fields.pop("hyperparameters", HP), **fields,
    )  # fmt: skip


def _command(trainer: Stamper, command: str, status: str, step: int, when: datetime, **fields: Any) -> Event:
    return trainer.emit(
        CommandResult, command_id=f"{command}-{step}", command=command, status=status, step=step, time=when,
        issued_by=fields.pop("issued_by", "alice"), **fields,
    )  # fmt: skip


def resumed(run_id: str, clock: Clock) -> Stream:
    """Killed at step 12, resumed from checkpoint-10 as attempt 2, which redoes the steps after it; a
    heartbeat of attempt 1 straggles in after attempt 2 started, and one of attempt 2 trails its
    newest logged step."""
    first, second = Stamper(MemorySink(), run_id), Stamper(MemorySink(), run_id, attempt=2)
    events = [_started(first, clock.at(120))]
    for step in range(1, 13):
        events.append(_step(first, step, clock.at(120 - step)))
        if step == 10:
            events.append(
                first.emit(Checkpoint, step=10, path="/c/10", sha256="a" * 64, size_bytes=1, time=clock.at(110))
            )
    events.append(first.emit(Heartbeat, step=12, phase="training", time=clock.at(107)))
    events.append(_started(second, clock.at(20), resumed_from_step=10))
    events.append(first.emit(Heartbeat, step=12, phase="training", time=clock.at(19)))  # the old trainer, late
    events += [_step(second, step, clock.at(20 - step)) for step in range(11, 15)]
    events.append(second.emit(Heartbeat, step=13, phase="training", time=clock.at(2)))  # read before step 14 was
    return Stream(run_id, events, "running", 14, 2, trainer_silent_for=2)


def stalled(run_id: str, clock: Clock) -> Stream:
    """Killed with ``kill -9`` ten minutes ago; since then only the audit gate and a user spoke of it."""
    trainer = Stamper(MemorySink(), run_id)
    audit, user = Stamper(MemorySink(), run_id, source="audit"), Stamper(MemorySink(), run_id, source="user")
    events = [_started(trainer, clock.at(700))]
    events += [_step(trainer, step, clock.at(700 - step)) for step in range(1, 6)]
    events.append(trainer.emit(Heartbeat, step=5, phase="training", time=clock.at(600)))
    events.append(
        audit.emit(
            AuditFlag, rule="run_stalled", severity="warning", message="no heartbeat for 30 s",
            judged_event_id=events[-1].event_id, time=clock.at(560),
        )
    )  # fmt: skip
    events.append(user.emit(RunTag, tags={"status": "dead?"}, issued_by="alice", time=clock.at(5)))
    return Stream(run_id, events, "stalled", 5, 1, trainer_silent_for=600)


def paused_and_stopped(run_id: str, clock: Clock) -> Stream:
    """Paused at step 8, given ``set weight_decay=0.1 eval_steps=50`` (no step logged after it),
    resumed, then stopped at step 10: the last ``train.step`` still carries the old values."""
    trainer = Stamper(MemorySink(), run_id)
    changes = {"weight_decay": 0.1, "eval_steps": 50}
    events = [_started(trainer, clock.at(100)), _step(trainer, 5, clock.at(95))]
    events += [
        _command(trainer, "pause", "accepted", 7, clock.at(93)),
        trainer.emit(RunState, state="paused", step=8, reason="pause by alice", time=clock.at(92)),
        _command(trainer, "pause", "applied", 8, clock.at(92)),
        trainer.emit(Heartbeat, step=8, phase="paused", time=clock.at(90)),
        _command(trainer, "set", "accepted", 8, clock.at(89)),
        _command(trainer, "set", "applied", 8, clock.at(88), applied={**changes, "current_learning_rate": 2e-3}),
        trainer.emit(RunState, state="running", step=8, reason="resume by alice", time=clock.at(87)),
        _command(trainer, "resume", "applied", 8, clock.at(87)),
        _command(trainer, "stop", "accepted", 9, clock.at(85)),
        trainer.emit(RunState, state="stopping", step=10, reason="stop by alice", time=clock.at(84)),
        trainer.emit(Checkpoint, step=10, path="/c/10", sha256="b" * 64, size_bytes=1, trigger="final", time=clock.at(84)),
        _command(trainer, "stop", "applied", 10, clock.at(83)),
        _command(trainer, "evaluate", "rejected", 10, clock.at(83), code="finished", message="the run ended"),
        trainer.emit(RunFinished, status="stopped", step=10, reason="stop by alice", time=clock.at(82)),
    ]  # fmt: skip
    return Stream(run_id, events, "stopped", 10, 1, hyperparameters=changes, trainer_silent_for=82)


def sweep_trial(run_id: str, clock: Clock) -> Stream:
    """Trial 3 of a sweep, pruned by the driver after its evaluation at step 20."""
    trainer = Stamper(MemorySink(), run_id)
    events = [_started(trainer, clock.at(60), sweep=SweepTag(name="lifecycle", trial=3))]
    for step in (10, 20):
        events.append(_step(trainer, step, clock.at(60 - step)))
        events.append(
            trainer.emit(Evaluation, step=step, loss=0.5, accuracy=0.2, num_samples=8, time=clock.at(59 - step))
        )
    events += [
        trainer.emit(Heartbeat, step=21, phase="training", time=clock.at(35)),
        _command(trainer, "stop", "accepted", 21, clock.at(34), issued_by="sweep:lifecycle"),
        trainer.emit(RunState, state="stopping", step=21, reason="pruned at step 20", time=clock.at(33)),
        _command(trainer, "stop", "applied", 21, clock.at(33), issued_by="sweep:lifecycle"),
        trainer.emit(RunFinished, status="stopped", step=21, reason="pruned at step 20", time=clock.at(32)),
    ]  # fmt: skip
    return Stream(run_id, events, "stopped", 21, 1, trainer_silent_for=32)


def publish(url: str, streams: list[Stream]) -> None:
    """Store every stream's events on JetStream, in order, with their event ids as ``Nats-Msg-Id``."""

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, StreamSettings())
            for stream in streams:
                for event in stream.events:
                    data = event.model_dump_json().encode()
                    await js.publish(
                        event_subject(event.run_id, event.type), data, headers={"Nats-Msg-Id": event.event_id}
                    )
        finally:
            await nc.close()

    asyncio.run(go())
