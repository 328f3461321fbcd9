"""Immutable copies of a run for the pages: a ``RunSummary`` per Runs-page row, a ``RunSnapshot``
of everything one run shows. The reader makes them under its lock (``summarise``,
``snapshot_run``); the copies are bounded because the state they copy is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dashboards.app.rows import CheckpointRow, CommandRow, EvalPoint, FlagRow, LoadRow, Marker, NoteRow
from dashboards.app.series import Floats, for_display
from dashboards.app.state import RunView
from schemas import ForkTag


@dataclass(frozen=True)
class RunSummary:
    """One row of the Runs page."""

    run_id: str
    state: str
    """The lifecycle state from the stream; pages show ``state_of`` it (stalled)."""
    finished: bool
    """Completed, stopped or failed: no trainer listens to commands (until a resumed attempt)."""
    attempt: int
    step: int
    max_steps: int | None
    loss: float | None
    learning_rate: float | None
    """The rate the optimizer uses now: the latest ``train.step``'s (its schedule's value)."""
    best_accuracy: float | None
    eval_accuracy: float | None
    """The latest evaluation's accuracy (what `trainbus runs` shows as eval_accuracy)."""
    best_perplexity: float | None
    """Lowest eval perplexity (chat runs; None for a classifier)."""
    approved: int
    rejected: int
    pending: int
    model: str
    adapter: str
    first_event_time: float
    last_event_time: float
    """Newest event of the run's trainer (current attempt): the "last event" shown, and liveness."""
    config: dict[str, Any]
    sweep: str | None = None
    trial: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    """``trainbus tag`` labels of the run."""
    fork: ForkTag | None = None
    """Where the run was forked from (parent, step, what changed); None for a run started from scratch."""
    group: str | None = None
    """The ``--seeds`` group the run belongs to."""


@dataclass(frozen=True)
class RunSnapshot:
    """An immutable copy of one run, for one page rerun (or many, while nothing changed)."""

    summary: RunSummary
    version: int
    reason: str
    config_hash: str
    hyperparameters: dict[str, Any]
    series: dict[str, tuple[Floats, Floats]]
    non_finite: dict[str, tuple[float, ...]]
    evals: tuple[EvalPoint, ...]
    checkpoints: tuple[CheckpointRow, ...]
    best_verdict: str | None
    flags: tuple[FlagRow, ...]
    commands: tuple[CommandRow, ...]
    markers: tuple[Marker, ...]
    notes: tuple[NoteRow, ...]
    serving: tuple[LoadRow, ...]
    """The newest load of each (alias, replica) serving one of the run's checkpoints, oldest first."""
    loads: tuple[LoadRow, ...]

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    @cached_property
    def display(self) -> dict[str, tuple[Floats, Floats]]:
        """Every series thinned for a chart (spikes kept), computed once per snapshot."""
        return {name: for_display(x, y) for name, (x, y) in self.series.items()}

    def command(self, command_id: str) -> CommandRow | None:
        """The stream's record of one command, if it has arrived."""
        return next((c for c in self.commands if c.command_id == command_id), None)


def _best(run: RunView, metric: str, pick: Callable[[list[float]], float]) -> float | None:
    values = [e.metrics.get(metric) for e in run.evals]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return pick(finite) if finite else None


def _latest(run: RunView, metric: str) -> float | None:
    for point in reversed(run.evals):
        value = point.metrics.get(metric)
        if value is not None:
            return value
    return None


def summarise(run: RunView) -> RunSummary:
    """The Runs-page row of ``run`` (call under the reader's lock)."""
    life, started = run.life, run.life.started
    verdicts = [c.verdict for c in run.checkpoints.values()]
    return RunSummary(
        run_id=run.run_id,
        state=life.state,
        finished=life.finished,
        attempt=life.attempt,
        step=run.step,
        max_steps=started.max_steps if started else None,
        loss=run.series["loss"].latest,
        learning_rate=run.series["learning_rate"].latest,
        best_accuracy=_best(run, "accuracy", max),
        eval_accuracy=_latest(run, "accuracy"),
        best_perplexity=_best(run, "perplexity", min),
        approved=verdicts.count("approved"),
        rejected=verdicts.count("rejected"),
        pending=verdicts.count("pending"),
        model=started.model if started else "",
        adapter=started.adapter if started else "",
        first_event_time=run.first_event_time,
        last_event_time=life.trainer_time,
        config=started.config if started else {},
        sweep=started.sweep.name if started and started.sweep else None,
        trial=started.sweep.trial if started and started.sweep else None,
        tags=dict(run.tags),
        fork=started.fork if started else None,
        group=started.group if started else None,
    )


def snapshot_run(run: RunView, best_verdict: str | None = None) -> RunSnapshot:
    """An immutable copy of ``run`` (call under the reader's lock; copies are small and bounded)."""
    return RunSnapshot(
        summary=summarise(run),
        version=run.version,
        reason=run.life.reason,
        config_hash=run.life.started.config_hash if run.life.started else "",
        hyperparameters=dict(run.life.hyperparameters),
        series={name: s.arrays() for name, s in run.series.items()},
        non_finite={name: tuple(s.non_finite) for name, s in run.series.items()},
        evals=tuple(run.evals),
        checkpoints=tuple(CheckpointRow(**c.__dict__) for c in run.checkpoints.values()),
        best_verdict=best_verdict,
        flags=tuple(run.flags),
        commands=tuple(CommandRow(**c.__dict__) for c in run.commands.values()),
        markers=tuple(run.markers),
        notes=tuple(run.notes),
        serving=tuple(run.serving.values()),
        loads=tuple(run.loads),
    )
