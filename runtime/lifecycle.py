"""A run's lifecycle folded from its events: the one fold `trainbus runs`, the exporter and the
dashboard share, so the three show a run in the same state, at the same step and attempt.

Pure: ``fold(life, event)`` folds one event into a ``Lifecycle`` (in place) with no I/O and no
clock; ``shown_state`` adds the clock (``stalled``). Each reader feeds the events it has in
stream order and adds its own projections on top (charts, gauges, table columns).

The rules, and why:

- **attempt** is the highest attempt the run's trainer published. A trainer event of a lower
  attempt is a straggler of an attempt that was replaced (its trainer was fenced, or killed and
  resumed): it changes nothing, and ``fold`` returns False so a reader can leave it out of its
  own projections too.
- **step** is where the current attempt is. ``run.started`` (from ``resumed_from_step``),
  ``run.state``, ``run.finished``, ``train.step`` and ``heartbeat`` move it. Within an attempt it
  never goes back: the heartbeat thread reads the step before the training thread publishes a
  newer one, so a heartbeat may trail by a step. A new attempt starts again from its checkpoint,
  because it redoes the steps after it: the step then goes back, on purpose.
- **state** is ``running`` from ``run.started``, then what ``run.state`` says, until
  ``run.finished``, which is final for the attempt (a late ``run.state`` from a racing thread
  cannot undo it). A new attempt opens it again.
- **hyperparameters** are the live values: ``run.started``'s, replaced by every ``train.step``
  that carries them (the trainer's values at that step), updated by every applied ``set`` (its
  effective values), so a ``set`` applied after the last logged step shows at once.
- **launch**: a run queued with `trainbus submit` is ``queued``, then ``starting`` (or ``cancelled``,
  or ``failed`` when its trainer refused the config) from its ``job.state`` events until its
  trainer speaks; a job requeued after its agent was lost shows ``queued`` again until the next
  attempt starts.
- **times**: ``last_event_time`` is the newest event of the run from anyone; ``trainer_time`` the
  newest event of the current attempt's trainer. Liveness reads ``trainer_time``: a tag, a note
  or the audit gate's flag about the silence says nothing about whether the trainer lives.

A trainer sends a heartbeat every few seconds while it lives, also while paused or evaluating,
so a live state whose trainer has been silent for ``STALL_AFTER_SECONDS`` is shown ``stalled``: it
died (``kill -9``, a lost node) without publishing ``run.finished``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas import CommandResult, Event, Heartbeat, JobState, RunFinished, RunStarted, RunState, TrainStep
from schemas.commands import SETTABLE

LIVE_STATES = frozenset({"running", "paused", "stopping"})
"""States of a run whose trainer should still be sending heartbeats."""
RUN_STATES = ("queued", "starting", "running", "paused", "stopping", "stalled", "completed", "stopped", "failed", "cancelled", "unknown")  # fmt: skip
"""Every state a run is shown in; ``queued``, ``starting`` and ``cancelled`` come from its launch job."""
_JOB_STATES = {
    "queued": "queued",
    "requeued": "queued",
    "starting": "starting",
    "failed": "failed",
    "cancelled": "cancelled",
}
"""What a launch job's state says of a run its trainer has not spoken for (yet, or again)."""
STALL_AFTER_SECONDS = 30.0
"""Silence after which a live run counts as stalled (the audit gate's ``run_stalled`` default)."""


@dataclass
class Lifecycle:
    """Where one run is: mutated only by ``fold``."""

    attempt: int = 1
    state: str = "unknown"
    """``unknown`` until ``run.started``; then ``running``, ``paused``, ``stopping``, or how it finished."""
    finished: bool = False
    reason: str = ""
    """Why it is in its state: the reason of its ``run.state``, or the error or reason it finished with."""
    step: int | None = None
    """The current attempt's step; None until an event that reports progress."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    started: RunStarted | None = None
    """The newest ``run.started`` seen (model, adapter, config, max_steps, sweep): the current attempt's,
    unless that one was never seen (a resumed attempt's events stay, its ``run.started`` aged out)."""
    last_event_time: float = 0.0
    """Unix time of the run's newest event, from any source (publisher clock)."""
    trainer_time: float = 0.0
    """Unix time of the newest event of the current attempt's trainer: what liveness reads."""
    job: JobState | None = None
    """The newest ``job.state`` of the run's launch job (None: started by hand)."""


def fold(life: Lifecycle, event: Event) -> bool:
    """Fold ``event`` into ``life``; False for a straggler of a replaced attempt (nothing changed
    but ``last_event_time``)."""
    when = event.time.timestamp()
    life.last_event_time = max(life.last_event_time, when)
    if isinstance(event, JobState):
        _on_job(life, event, when)
    if event.source != "trainer":
        return True
    if event.attempt < life.attempt:
        return False
    if event.attempt > life.attempt:
        _new_attempt(life, event.attempt)
    life.trainer_time = max(life.trainer_time, when)
    handler = HANDLERS.get(type(event))
    if handler is not None:
        handler(life, event)
    return True


def _on_job(life: Lifecycle, event: JobState, when: float) -> None:
    life.job = event
    shown = _JOB_STATES.get(event.state)
    if shown is None or (life.trainer_time and when < life.trainer_time):
        return  # the trainer speaks for the run; an older job change says nothing new
    if life.started is None or (event.state in ("requeued", "starting") and life.trainer_time):
        life.state, life.reason = shown, event.reason
        life.finished = shown in ("failed", "cancelled")


def _new_attempt(life: Lifecycle, attempt: int) -> None:
    """A resumed attempt (its ``run.started`` may not have been seen): the run lives again."""
    life.attempt, life.step, life.trainer_time = attempt, None, 0.0
    life.state, life.finished, life.reason = "running", False, ""


def _progress(life: Lifecycle, step: int) -> None:
    life.step = step if life.step is None else max(life.step, step)


def _on_started(life: Lifecycle, event: RunStarted) -> None:
    life.state, life.finished, life.reason = "running", False, ""
    life.started = event
    life.step = event.resumed_from_step or 0
    life.hyperparameters = event.hyperparameters.model_dump()


def _on_state(life: Lifecycle, event: RunState) -> None:
    if not life.finished:
        life.state, life.reason = event.state, event.reason
    _progress(life, event.step)


def _on_finished(life: Lifecycle, event: RunFinished) -> None:
    life.state, life.finished, life.reason = event.status, True, event.error or event.reason
    _progress(life, event.step)


def _on_step(life: Lifecycle, event: TrainStep) -> None:
    _progress(life, event.step)
    if event.hyperparameters is not None:
        life.hyperparameters = event.hyperparameters.model_dump()


def _on_heartbeat(life: Lifecycle, event: Heartbeat) -> None:
    _progress(life, event.step)


def _on_command(life: Lifecycle, event: CommandResult) -> None:
    if event.command == "set" and event.status == "applied":
        life.hyperparameters.update({k: v for k, v in event.applied.items() if k in SETTABLE})


HANDLERS: dict[type[Event], Callable[[Lifecycle, Any], None]] = {
    RunStarted: _on_started,
    RunState: _on_state,
    RunFinished: _on_finished,
    TrainStep: _on_step,
    Heartbeat: _on_heartbeat,
    CommandResult: _on_command,
}
"""What each trainer event does to the lifecycle; the other event types change only the times."""


def shown_state(state: str, trainer_time: float, now: float, stall_after: float = STALL_AFTER_SECONDS) -> str:
    """``state``, or ``stalled`` when a live run's trainer has been silent for more than ``stall_after`` s.

    Times are Unix seconds; ``trainer_time`` is the newest event of the run's current attempt
    (``Lifecycle.trainer_time``). A resumed attempt publishes new events, so it replaces a stalled
    one by itself; a finished run is silent by design and never stalled.
    """
    if state in LIVE_STATES and now - trainer_time > stall_after:
        return "stalled"
    return state


def shown(life: Lifecycle, now: float, stall_after: float = STALL_AFTER_SECONDS) -> str:
    """The state to show for ``life`` at ``now`` (see ``shown_state``)."""
    return shown_state(life.state, life.trainer_time, now, stall_after)
