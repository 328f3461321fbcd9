"""What the Prometheus exporter knows: the latest state of every run, built from its events.

Pure: ``handle(event, state)`` folds one event into ``state`` (in place, and returns it) with no
I/O and no clock: every event goes through the run lifecycle fold (``runtime.lifecycle``, shared
with `trainbus runs` and the dashboard), then through the exporter's own ``HANDLERS``.
``expire`` drops runs whose last event is older than a cut-off, finished or not (a trainer
killed with ``kill -9`` never says it finished). The exporter rebuilds this state
by replaying the stream on every start, so a restart reproduces the same counters; counting is
idempotent by ``event_id`` because delivery is at least once, in bounded memory (``SeenIds``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.lifecycle import Lifecycle, fold
from schemas import AuditFlag, AuditVerdict, Checkpoint, CommandResult, Evaluation, Event, RunStarted, TrainStep
from schemas.predict import PredictorLoaded

"""Every value of ``trainbus_run_state{state=...}``; exactly one is 1 per run."""
VERDICTS = ("pending", "approved", "rejected")
"""Every value of ``trainbus_checkpoints{verdict=...}``; all are exported, 0 included."""
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the event-lag histogram."""
TOMBSTONES = 10_000
"""How many expired run ids are remembered so a straggling event does not resurrect them."""
MAX_AHEAD = 4096
"""Seqs remembered above a publisher's contiguous watermark; past that, the gap counts as lost."""
MAX_OTHER_IDS = 10_000
"""Event ids not of the ``<prefix>.<seq>`` form remembered per run (the newest ones)."""

_TRAIN_FIELDS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "epoch",
    "tokens_per_second",
    "samples_per_second",
    "step_time_seconds",
    "memory_bytes",
)
_EVAL_FIELDS = (
    "loss", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost", "text_only_accuracy",
    "text_only_abstain_rate",
)  # fmt: skip


@dataclass
class SeqWindow:
    """The seqs of one publisher (one event-id prefix) already counted: every seq up to
    ``watermark``, plus the few seen above it out of order."""

    watermark: int = 0
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> bool:
        """Record ``seq``; False when it was already counted."""
        if seq <= self.watermark or seq in self.above:
            return False
        self.above.add(seq)
        if len(self.above) > MAX_AHEAD:
            # a gap that never filled (its events aged out of the stream, or were lost): give up on it
            self.watermark = min(self.above) - 1
        while self.watermark + 1 in self.above:
            self.watermark += 1
            self.above.discard(self.watermark)
        return True


@dataclass
class SeenIds:
    """Event ids already counted for one run, in memory that does not grow with the run's length.

    ``runtime.publish.sinks.Stamper`` ids are ``<run>.<attempt>.<seq>`` (``<run>.<source>.<attempt>.<seq>``
    for other sources) with seq 1, 2, 3, … per publisher, so they are kept as a contiguous
    watermark per prefix plus the seqs above it; other ids (the audit gate names its events after
    what they judge) are kept as such, the newest ``MAX_OTHER_IDS`` of them.
    """

    windows: dict[str, SeqWindow] = field(default_factory=dict)
    others: dict[str, None] = field(default_factory=dict)

    def add(self, event: Event) -> bool:
        """Record one event; False when it was already counted."""
        prefix = (
            f"{event.run_id}.{event.attempt}"
            if event.source == "trainer"
            else f"{event.run_id}.{event.source}.{event.attempt}"
        )
        if event.event_id == f"{prefix}.{event.seq}":
            return self.windows.setdefault(prefix, SeqWindow()).add(event.seq)
        if event.event_id in self.others:
            return False
        self.others[event.event_id] = None
        if len(self.others) > MAX_OTHER_IDS:
            del self.others[next(iter(self.others))]
        return True

    def __len__(self) -> int:
        """How many ids are held one by one (what the memory grows with)."""
        return len(self.others) + sum(len(w.above) + 1 for w in self.windows.values())


@dataclass
class RunMetrics:
    """Latest values and counters of one run, on top of its lifecycle."""

    run_id: str
    life: Lifecycle = field(default_factory=Lifecycle)
    """State, step, attempt, liveness times and live hyper-parameters (``runtime.lifecycle``)."""
    train: dict[str, float] = field(default_factory=dict)
    """Latest ``train.step`` values by field name; a field the event left out is absent."""
    eval: dict[str, float] = field(default_factory=dict)
    """Latest ``eval`` values by field name (``step`` included)."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Checkpoint event_id -> ``pending``, ``approved`` or ``rejected``."""
    checkpoint_bytes: int | None = None
    audit_flags: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(rule, severity) -> flags."""
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(command, result) -> ``command.result`` events."""
    events: Counter[str] = field(default_factory=Counter)
    """Event type -> events."""
    served: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Predictor alias -> (checkpoint step it serves, Unix time it was loaded), from ``predictor.loaded``."""
    seen: SeenIds = field(default_factory=SeenIds, repr=False)
    """Event ids already counted."""

    def verdict_counts(self) -> dict[str, int]:
        """Checkpoints by verdict, every verdict present."""
        counts = Counter(self.checkpoints.values())
        return {verdict: counts.get(verdict, 0) for verdict in VERDICTS}


@dataclass
class LagHistogram:
    """Event lag in seconds; ``buckets[i]`` counts lags in (LAG_BUCKETS[i-1], LAG_BUCKETS[i]]."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(LAG_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        """Add one observation (negative lag from clock skew counts as 0)."""
        seconds = max(0.0, seconds)
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(LAG_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(LAG_BUCKETS, self.buckets, strict=True):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class ExporterState:
    """All runs the exporter tracks, plus the exporter's own counters."""

    runs: dict[str, RunMetrics] = field(default_factory=dict)
    expired: dict[str, bool] = field(default_factory=dict)
    """Run ids dropped by ``expire`` -> whether the run had finished (oldest first, at most ``TOMBSTONES``)."""
    invalid_events: int = 0
    newer_events: int = 0
    """Events of a newer schema_version, skipped."""
    duplicate_events: int = 0
    ignored_events: int = 0
    """Events of runs that had already expired."""
    expired_runs: int = 0
    lag: LagHistogram = field(default_factory=LagHistogram)
    caught_up: bool = False
    """True once the replay of the stream's backlog is done."""


def _run_for(event: Event, state: ExporterState) -> RunMetrics | None:
    run = state.runs.get(event.run_id)
    if run is not None:
        return run
    finished = state.expired.get(event.run_id)
    # a finished run comes back only with a resumed attempt; one that went silent, with any
    # event of its trainer (it was cut off, not dead); a straggler of either stays ignored
    if finished is not None and not (isinstance(event, RunStarted) or (not finished and event.source == "trainer")):
        return None
    state.expired.pop(event.run_id, None)
    run = state.runs[event.run_id] = RunMetrics(run_id=event.run_id)
    return run


def handle(event: Event, state: ExporterState) -> ExporterState:
    """Fold ``event`` into ``state`` (mutated and returned); a second delivery of an event is ignored."""
    run = _run_for(event, state)
    if run is None:
        state.ignored_events += 1
        return state
    if not run.seen.add(event):
        state.duplicate_events += 1
        return state
    run.events[event.type] += 1
    fold(run.life, event)
    handler = HANDLERS.get(type(event))
    if handler is not None:
        handler(run, event)
    return state


def _on_step(run: RunMetrics, event: TrainStep) -> None:
    values = {name: getattr(event, name) for name in _TRAIN_FIELDS}
    run.train = {name: float(v) for name, v in values.items() if v is not None}


def _on_eval(run: RunMetrics, event: Evaluation) -> None:
    values = {name: getattr(event, name) for name in _EVAL_FIELDS}
    run.eval = {name: float(v) for name, v in values.items() if v is not None}
    run.eval["step"] = float(event.step)


def _on_checkpoint(run: RunMetrics, event: Checkpoint) -> None:
    run.checkpoints.setdefault(event.event_id, "pending")
    run.checkpoint_bytes = event.size_bytes


def _on_verdict(run: RunMetrics, event: AuditVerdict) -> None:
    run.checkpoints[event.checkpoint_event_id] = event.verdict


def _on_flag(run: RunMetrics, event: AuditFlag) -> None:
    run.audit_flags[(event.rule, event.severity)] += 1


def _on_command(run: RunMetrics, event: CommandResult) -> None:
    run.commands[(event.command, event.status)] += 1


def _on_loaded(run: RunMetrics, event: PredictorLoaded) -> None:
    run.served[event.alias] = (event.step, event.time.timestamp())


HANDLERS: dict[type[Event], Callable[[RunMetrics, Any], None]] = {
    TrainStep: _on_step,
    Evaluation: _on_eval,
    Checkpoint: _on_checkpoint,
    AuditVerdict: _on_verdict,
    AuditFlag: _on_flag,
    CommandResult: _on_command,
    PredictorLoaded: _on_loaded,
}
"""The exporter's own projections, per event type, on top of the lifecycle fold (which every event goes through)."""


def count_invalid(state: ExporterState) -> ExporterState:
    """Count one event that failed validation (the loop logs and acks it)."""
    state.invalid_events += 1
    return state


def count_newer(state: ExporterState) -> ExporterState:
    """Count one event of a newer schema_version (the loop reports it once per run and acks it)."""
    state.newer_events += 1
    return state


def expire(state: ExporterState, now: float, after: float) -> list[str]:
    """Drop runs whose newest event is more than ``after`` seconds before ``now``, finished or not."""
    gone = [r.run_id for r in state.runs.values() if now - r.life.last_event_time > after]
    for run_id in gone:
        state.expired[run_id] = state.runs.pop(run_id).life.finished
    while len(state.expired) > TOMBSTONES:
        del state.expired[next(iter(state.expired))]
    state.expired_runs += len(gone)
    return gone
