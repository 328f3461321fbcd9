"""What the dashboard knows about every run, folded from the event stream, and its snapshots.

Pure: ``handle(event, state, stream_seq)`` folds one event into ``state`` (in place, and returns
it) with no I/O and no clock: first through the run lifecycle fold (``runtime.lifecycle``, shared
with `trainbus runs` and the exporter), then through the dashboard's own ``HANDLERS``. The bus reader (``dashboards.app.reader``) calls it under a lock
from its own thread; pages only ever see the immutable copies ``dashboards.app.snapshot`` makes,
so a page never races the reader.

Memory is bounded per run: metric series are capped (``dashboards.app.series``), and the
low-volume history (evaluations, checkpoints, flags, commands, notes, predictor loads, markers)
is capped too. A run purged from the stream (`trainbus runs rm`) is dropped with ``forget``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dashboards.app.rows import CheckpointRow, CommandRow, EvalPoint, FlagRow, LoadRow, Marker, NoteRow
from dashboards.app.series import Series
from runtime.lifecycle import Lifecycle, fold
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    RunNote,
    RunStarted,
    RunTag,
    TrainStep,
)
from schemas.commands import SETTABLE
from schemas.predict import PredictorLoaded

TRAIN_METRICS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "samples_per_second",
    "memory_bytes",
)
"""``train.step`` fields kept as series (the Run page charts)."""
EVAL_METRICS = ("loss", "perplexity", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost")
"""``eval`` fields kept per evaluation (a chat run fills ``loss`` and ``perplexity`` only)."""
EVALS_CAP = 500
FLAGS_CAP = 2_000
COMMANDS_CAP = 1_000
MARKERS_CAP = 1_000
CHECKPOINTS_CAP = 2_000
NOTES_CAP = 500
LOADS_CAP = 500
REMOVED_CAP = 1_000
INVALID_SHOWN = 5


@dataclass
class RunView:
    """Everything kept about one run (mutated only by ``handle``)."""

    run_id: str
    life: Lifecycle = field(default_factory=Lifecycle)
    """State, step, attempt, liveness and live hyper-parameters: the fold `trainbus runs` and the
    exporter share (``runtime.lifecycle``)."""
    first_event_time: float = 0.0
    series: dict[str, Series] = field(default_factory=lambda: {name: Series() for name in TRAIN_METRICS})
    evals: deque[EvalPoint] = field(default_factory=lambda: deque(maxlen=EVALS_CAP))
    checkpoints: dict[str, CheckpointRow] = field(default_factory=dict)
    verdicts: dict[str, AuditVerdict] = field(default_factory=dict)
    """Verdicts by checkpoint event id, kept even if the checkpoint event is missing."""
    flags: deque[FlagRow] = field(default_factory=lambda: deque(maxlen=FLAGS_CAP))
    commands: dict[str, CommandRow] = field(default_factory=dict)
    markers: deque[Marker] = field(default_factory=lambda: deque(maxlen=MARKERS_CAP))
    tags: dict[str, str] = field(default_factory=dict)
    notes: deque[NoteRow] = field(default_factory=lambda: deque(maxlen=NOTES_CAP))
    serving: dict[tuple[str, str], LoadRow] = field(default_factory=dict)
    """The newest load of each (alias, replica) that loaded one of the run's checkpoints."""
    loads: deque[LoadRow] = field(default_factory=lambda: deque(maxlen=LOADS_CAP))
    """Every ``predictor.loaded`` of the run, oldest first."""
    first_seq: int = 0
    """Stream sequence of the run's first event (0 when folded without one)."""
    events: int = 0
    version: int = 0
    """Bumped by every event, so snapshots can be reused while nothing changed."""

    @property
    def step(self) -> int:
        """The current attempt's step (0 before any progress)."""
        return self.life.step or 0


@dataclass
class DashboardState:
    """All runs, plus what the reader saw that was not a valid event."""

    runs: dict[str, RunView] = field(default_factory=dict)
    best: dict[str, str] = field(default_factory=dict)
    """Run id -> verdict event id of its ``best`` checkpoint (the audit gate's bucket pointer)."""
    invalid_events: int = 0
    invalid_recent: deque[str] = field(default_factory=lambda: deque(maxlen=INVALID_SHOWN))
    """Subject and error of the last few invalid events."""
    newer_events: int = 0
    """Events a newer trainbus wrote (a higher ``schema_version``): skipped, not invalid."""
    newer_runs: set[str] = field(default_factory=set)
    removed: dict[str, int] = field(default_factory=dict)
    """Runs purged from the stream -> the stream sequence they were purged at (events up to it are stale)."""
    last_stream_seq: int = 0
    events: int = 0


def handle(event: Event, state: DashboardState, stream_seq: int = 0) -> DashboardState:
    """Fold ``event`` into ``state`` (mutated and returned). Events at or below the last stream
    sequence seen are redeliveries and ignored (pass ``stream_seq=0`` to skip that check)."""
    if stream_seq:
        if stream_seq <= state.last_stream_seq:
            return state
        state.last_stream_seq = stream_seq
        if stream_seq <= state.removed.get(event.run_id, 0):
            return state  # delivered before its run was purged, folded after: the run stays gone
    run = state.runs.get(event.run_id)
    if run is None:
        run = state.runs[event.run_id] = RunView(
            run_id=event.run_id, first_event_time=event.time.timestamp(), first_seq=stream_seq
        )
    state.events += 1
    run.events += 1
    run.version += 1
    if not fold(run.life, event):
        return state  # a straggler of an attempt that was replaced: its series, evals and checkpoints are gone
    handler = HANDLERS.get(type(event))
    if handler is not None:
        handler(event, run)
    return state


def forget(state: DashboardState, run_id: str, purged_at: int) -> DashboardState:
    """Drop a run whose events were purged from the stream by ``purged_at`` (a stream sequence)."""
    state.runs.pop(run_id, None)
    state.best.pop(run_id, None)
    state.newer_runs.discard(run_id)
    state.removed[run_id] = max(purged_at, state.removed.get(run_id, 0))
    while len(state.removed) > REMOVED_CAP:
        del state.removed[next(iter(state.removed))]
    return state


def count_invalid(state: DashboardState, subject: str, error: str | None, stream_seq: int = 0) -> DashboardState:
    """Count one message that is not a valid event (shown as a small warning, never raised)."""
    if stream_seq:
        if stream_seq <= state.last_stream_seq:
            return state
        state.last_stream_seq = stream_seq
    state.invalid_events += 1
    state.invalid_recent.append(f"{subject}: {error or 'invalid'}")
    return state


def count_newer(state: DashboardState, run_id: str, stream_seq: int = 0) -> bool:
    """Count one event skipped because a newer trainbus wrote it; True the first time for its run
    (the reader logs it once per run)."""
    if stream_seq:
        if stream_seq <= state.last_stream_seq:
            return False
        state.last_stream_seq = stream_seq
    state.newer_events += 1
    first = run_id not in state.newer_runs
    state.newer_runs.add(run_id)
    return first


def _on_started(event: RunStarted, run: RunView) -> None:
    """A resumed attempt redoes the steps after its checkpoint: their points go, and a marker says so;
    a fork's first steps continue its parent's, and a marker says from where."""
    if event.attempt > 1 or event.resumed_from_step is not None:
        start = float(event.resumed_from_step or 0)
        for series in run.series.values():
            series.truncate_after(start)
        if event.fork is not None and event.attempt == 1:
            run.markers.append(Marker(start, "fork", f"forked from {event.fork.parent} at step {event.fork.step}"))
        else:
            run.markers.append(Marker(start, "resume", f"attempt {event.attempt} resumed"))


def _on_step(event: TrainStep, run: RunView) -> None:
    x = float(event.step)
    for name in TRAIN_METRICS:
        value = getattr(event, name)
        if value is not None:
            run.series[name].append(x, float(value))


def _on_eval(event: Evaluation, run: RunView) -> None:
    run.evals.append(
        EvalPoint(
            event_id=event.event_id,
            step=event.step,
            attempt=event.attempt,
            time=event.time,
            trigger=event.trigger,
            metrics={name: getattr(event, name) for name in EVAL_METRICS},
            per_label_f1=dict(event.per_label_f1),
            labels=tuple(event.labels),
            confusion_matrix=tuple(tuple(row) for row in event.confusion_matrix),
            num_samples=event.num_samples,
            num_abstained=event.num_abstained,
        )
    )


def _on_checkpoint(event: Checkpoint, run: RunView) -> None:
    row = CheckpointRow(
        event.event_id, event.step, event.attempt, event.time, event.trigger,
        event.path, event.sha256, event.size_bytes, dict(event.metrics),
    )  # fmt: skip
    verdict = run.verdicts.get(event.event_id)
    if verdict is not None:
        _judge(row, verdict)
    run.checkpoints[event.event_id] = row
    while len(run.checkpoints) > CHECKPOINTS_CAP:
        del run.checkpoints[next(iter(run.checkpoints))]


def _on_verdict(event: AuditVerdict, run: RunView) -> None:
    run.verdicts[event.checkpoint_event_id] = event
    while len(run.verdicts) > CHECKPOINTS_CAP:
        del run.verdicts[next(iter(run.verdicts))]
    row = run.checkpoints.get(event.checkpoint_event_id)
    if row is not None:
        _judge(row, event)


def _on_flag(event: AuditFlag, run: RunView) -> None:
    run.flags.append(
        FlagRow(
            event.time, event.step, event.rule, event.severity, event.message, event.value, event.threshold,
            tuple(event.actions_taken),
        )
    )  # fmt: skip
    if event.step is not None:
        run.markers.append(Marker(float(event.step), "flag", f"{event.severity}: {event.rule}"))


def _judge(row: CheckpointRow, verdict: AuditVerdict) -> None:
    row.verdict, row.reasons = verdict.verdict, tuple(verdict.reasons)
    row.verdict_metrics, row.verdict_event_id = dict(verdict.metrics), verdict.event_id


def _on_command(event: CommandResult, run: RunView) -> None:
    row = run.commands.get(event.command_id)
    if row is None:
        row = run.commands[event.command_id] = CommandRow(
            event.command_id, event.command, event.issued_by, event.time, event.status
        )
        while len(run.commands) > COMMANDS_CAP:
            del run.commands[next(iter(run.commands))]
    if row.status != "applied":  # an applied command stays applied whatever straggles in
        row.status = event.status
    row.code, row.message = event.code or row.code, event.message or row.message
    if event.status == "accepted":
        row.accepted_step = event.step
    elif event.status == "applied":
        row.applied_step, row.applied = event.step, dict(event.applied)
        if event.step is not None:
            run.markers.append(Marker(float(event.step), "command", _command_label(event)))


def _command_label(event: CommandResult) -> str:
    if event.command == "set":
        changes = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.applied.items() if k in SETTABLE
        )
        return f"set {changes}" if changes else "set"
    return event.command


def _on_tag(event: RunTag, run: RunView) -> None:
    run.tags.update(event.tags)
    run.tags = {k: v for k, v in run.tags.items() if v}  # an empty value removes the tag


def _on_note(event: RunNote, run: RunView) -> None:
    run.notes.append(NoteRow(event.time, run.step, event.issued_by, event.text))
    run.markers.append(Marker(float(run.step), "note", _short(event.text)))


def _on_loaded(event: PredictorLoaded, run: RunView) -> None:
    row = LoadRow(
        event.time, event.alias, event.instance, event.step, event.sha256, event.checkpoint_event_id,
        event.verdict, event.forced, event.trigger, event.previous_step, event.host,
    )  # fmt: skip
    run.loads.append(row)
    run.serving.pop((row.alias, row.instance), None)  # re-inserted last: the dict stays oldest first
    run.serving[(row.alias, row.instance)] = row
    while len(run.serving) > LOADS_CAP:
        del run.serving[next(iter(run.serving))]


HANDLERS: dict[type[Event], Callable[[Any, RunView], None]] = {
    RunStarted: _on_started,
    TrainStep: _on_step,
    Evaluation: _on_eval,
    Checkpoint: _on_checkpoint,
    AuditVerdict: _on_verdict,
    AuditFlag: _on_flag,
    CommandResult: _on_command,
    RunTag: _on_tag,
    RunNote: _on_note,
    PredictorLoaded: _on_loaded,
}
"""The dashboard's own projections, per event type, on top of the lifecycle fold (which every event
goes through first)."""


def _short(text: str, most: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= most else line[: most - 1] + "…"
