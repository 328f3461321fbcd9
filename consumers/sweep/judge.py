"""How the sweep driver judges one trial from its run's events: ``handle(event, watch)`` and ``outcome``.

No I/O, no clock, no Optuna: the driver feeds every event of the trial's run in stream order
(a restarted driver replays them from the start, so it reaches the same judgement) and asks
``outcome`` whether the trial is over. ``handle`` returns what the driver must do now: report an
evaluation to Optuna, or stop the run after a critical audit flag.

A trial is
- ``complete`` when its run completed: the objective is the metric of its last evaluation, unless
  a critical audit flag was raised or the audit gate rejected its last checkpoint (then ``fail``);
- ``pruned`` when it ended after this sweep's ``stop`` (Optuna's pruner asked for it);
- ``fail`` otherwise: the run failed, was stopped by someone else, went silent, or never started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    JobState,
    RunFinished,
    RunStarted,
)

TRAINER_EVENTS = frozenset(
    {"run.started", "run.state", "run.finished", "train.step", "eval", "checkpoint", "heartbeat", "command.result"}
)
"""Event types only a live trainer publishes: their silence means it is gone."""


@dataclass(frozen=True)
class Report:
    """Report the objective at ``step`` to Optuna (then, unless it is the run's last step, ask its
    pruner: stopping a run that has no step left saves nothing, and it deserves its judgement)."""

    step: int
    value: float
    last: bool = False


@dataclass(frozen=True)
class StopRun:
    """Stop the run: the trial has failed and need not use the CPU any longer."""

    reason: str


Action = Report | StopRun


@dataclass(frozen=True)
class Outcome:
    """The judgement of a finished trial."""

    state: Literal["complete", "pruned", "fail"]
    value: float | None = None
    reason: str = ""
    checkpoint: str | None = None
    verdict: str | None = None
    """``approved``, ``rejected`` or ``pending`` (no verdict came) for ``checkpoint``."""


@dataclass
class TrialWatch:
    """What the driver knows about one trial's run."""

    run_id: str
    metric: str
    issuer: str
    """``issued_by`` of this sweep's commands: a stop it sent is a prune, anyone else's is not."""
    started: bool = False
    attempt: int = 0
    max_steps: int | None = None
    evals: dict[int, float] = field(default_factory=dict)
    last_value: float | None = None
    last_eval_step: int | None = None
    checkpoint: Checkpoint | None = None
    verdicts: dict[str, AuditVerdict] = field(default_factory=dict)
    critical: AuditFlag | None = None
    stop_requested: str | None = None
    """Why the driver asked the run to stop (set by the driver when it sends ``stop``)."""
    stopped_by_sweep: bool = False
    finished: RunFinished | None = None
    job: JobState | None = None
    """The newest ``job.state`` of the trial's launch job (`trainbus sweep --queue`); None otherwise."""

    @property
    def last_verdict(self) -> AuditVerdict | None:
        return self.verdicts.get(self.checkpoint.event_id) if self.checkpoint is not None else None


def handle(event: Event, watch: TrialWatch) -> list[Action]:
    """Take one event of the trial's run into ``watch``; returns what the driver should do."""
    if isinstance(event, RunStarted) and event.attempt >= watch.attempt:
        watch.started, watch.attempt, watch.finished = True, event.attempt, None
        watch.max_steps = event.max_steps
    elif isinstance(event, Evaluation) and event.attempt >= watch.attempt:
        value = getattr(event, watch.metric, None)
        watch.last_eval_step = event.step
        watch.last_value = float(value) if value is not None else None
        if value is not None and math.isfinite(value):
            watch.evals[event.step] = float(value)
            last = watch.max_steps is not None and event.step >= watch.max_steps
            return [Report(event.step, float(value), last)]
    elif isinstance(event, Checkpoint):
        watch.checkpoint = event
    elif isinstance(event, AuditVerdict):
        watch.verdicts[event.checkpoint_event_id] = event
    elif isinstance(event, AuditFlag) and event.severity == "critical" and watch.critical is None:
        watch.critical = event
        return [StopRun(f"critical audit flag {event.rule}: {event.message}")]
    elif isinstance(event, CommandResult) and event.command == "stop" and event.issued_by == watch.issuer:
        watch.stopped_by_sweep = watch.stopped_by_sweep or event.status in ("accepted", "applied")
    elif isinstance(event, RunFinished) and event.attempt >= watch.attempt:
        watch.finished = event
    elif isinstance(event, JobState):
        watch.job = event
    return []


def outcome(watch: TrialWatch, *, verdict_waited: bool, gone: str | None = None) -> Outcome | None:
    """The trial's judgement, or None while it is still going.

    ``verdict_waited``: the driver has waited long enough for the audit gate's verdict on the last
    checkpoint (a run without an audit gate is judged without one). ``gone``: why the trainer can
    no longer finish the run (it went silent, or its process exited), if it cannot.
    """
    finished = watch.finished
    if finished is None and gone is None:
        return None
    if watch.critical is not None:
        flag = watch.critical
        return Outcome("fail", watch.last_value, f"critical audit flag {flag.rule} at step {flag.step}: {flag.message}")
    if watch.stopped_by_sweep or (watch.stop_requested is not None and finished is None):
        return Outcome("pruned", watch.last_value, watch.stop_requested or "stopped by this sweep")
    if finished is None:
        return Outcome("fail", watch.last_value, gone or "")
    if finished.status == "failed":
        return Outcome("fail", watch.last_value, f"run failed: {finished.error or finished.reason}")
    if finished.status == "stopped":
        return Outcome("fail", watch.last_value, f"run stopped before the end: {finished.reason}")
    ckpt, verdict = watch.checkpoint, watch.last_verdict
    if ckpt is not None and verdict is None and not verdict_waited:
        return None
    shown = "pending" if verdict is None else verdict.verdict
    path = ckpt.path if ckpt is not None else None
    if verdict is not None and verdict.verdict == "rejected":
        why = "; ".join(verdict.reasons) or "no reason given"
        return Outcome("fail", watch.last_value, f"last checkpoint (step {ckpt.step if ckpt else '?'}) rejected: {why}", path, shown)  # fmt: skip
    if watch.last_value is None or not math.isfinite(watch.last_value):
        return Outcome("fail", None, f"its last evaluation has no finite {watch.metric}", path, shown)
    return Outcome("complete", watch.last_value, "", path, shown if ckpt is not None else None)
