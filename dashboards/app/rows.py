"""The rows the dashboard keeps about a run: evaluations, checkpoints, commands, flags, notes,
predictor loads and chart markers.

Plain dataclasses with no behaviour; ``dashboards.app.state`` makes them from events, the
snapshots copy them and the table and chart builders read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of a run."""

    event_id: str
    step: int
    attempt: int
    time: datetime
    trigger: str
    metrics: dict[str, float | None]
    per_label_f1: dict[str, float]
    labels: tuple[str, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    """Empty for a run whose task has no labels (chat fine-tuning): no heatmap then."""
    num_samples: int
    num_abstained: int | None = None


@dataclass
class CheckpointRow:
    """A checkpoint and, once the audit gate has ruled, its verdict."""

    event_id: str
    step: int
    attempt: int
    time: datetime
    trigger: str
    path: str
    sha256: str
    size_bytes: int
    metrics: dict[str, float]
    verdict: str = "pending"
    reasons: tuple[str, ...] = ()
    verdict_metrics: dict[str, float] = field(default_factory=dict)
    verdict_event_id: str | None = None


@dataclass
class CommandRow:
    """One control command as the stream tells it: who sent what, and what the trainer did."""

    command_id: str
    command: str
    issued_by: str
    time: datetime
    status: str
    code: str = ""
    message: str = ""
    accepted_step: int | None = None
    applied_step: int | None = None
    applied: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FlagRow:
    """One audit flag."""

    time: datetime
    step: int | None
    rule: str
    severity: str
    message: str
    value: float | None
    threshold: float | None
    actions_taken: tuple[str, ...]


@dataclass(frozen=True)
class Marker:
    """A step worth a vertical rule on every chart of the run."""

    step: float
    kind: str
    """``command``, ``resume``, ``flag`` or ``note``."""
    label: str


@dataclass(frozen=True)
class NoteRow:
    """A note someone wrote about the run (``trainbus note``), at the step the run had reached."""

    time: datetime
    step: int
    issued_by: str
    text: str


@dataclass(frozen=True)
class LoadRow:
    """A predictor (``trainbus serve``) loaded one of the run's checkpoints under an alias."""

    time: datetime
    """Since when it serves this checkpoint."""
    alias: str
    instance: str
    """The service instance (one replica) that loaded it."""
    step: int
    sha256: str
    checkpoint_event_id: str | None
    verdict: str
    forced: bool
    trigger: str
    """``start`` or ``hot_swap``."""
    previous_step: int | None
    host: str
