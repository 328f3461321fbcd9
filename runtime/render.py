"""Human-readable one-line summaries of events for `trainbus events` and `trainbus runs`."""

from __future__ import annotations

import math
from typing import Any

from schemas import Event


def fmt(value: Any) -> str:
    """Compact number formatting that keeps NaN and inf visible."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


_FIELDS: dict[str, tuple[str, ...]] = {
    "run.started": ("model", "adapter", "world_size", "max_steps"),
    "run.state": ("state", "step", "reason"),
    "run.finished": ("status", "step", "reason", "error"),
    "train.step": ("step", "loss", "learning_rate", "grad_norm", "samples_per_second"),
    "eval": ("step", "loss", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost"),
    "checkpoint": ("step", "path", "size_bytes"),
    "command.result": ("command", "status", "code", "step", "issued_by", "message"),
    "audit.flag": ("rule", "severity", "step", "message"),
    "audit.verdict": ("checkpoint_step", "verdict", "reasons"),
    "heartbeat": ("step", "phase"),
    "predictor.loaded": ("alias", "step", "verdict", "trigger", "instance"),
}


def age(seconds: float) -> str:
    """How long ago, the way a person reads it: ``4s ago``, ``12m ago``, ``3h ago``, ``2d ago``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def summary(event: Event) -> str:
    """``key=value`` pairs of the fields that matter for this event type."""
    parts = []
    for name in _FIELDS.get(event.type, ()):
        value = getattr(event, name, None)
        if value in (None, "", [], {}):
            continue
        parts.append(f"{name}={fmt(value)}")
    return " ".join(parts)


def event_row(stream_seq: int, event: Event) -> str:
    """One table row: stream seq, time, source/seq, type, summary."""
    return (
        f"{stream_seq:>6}  {event.time:%H:%M:%S.%f}"[:-3]
        + f"  {event.source}#{event.seq:<5} {event.type:<15} {summary(event)}"
    )


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[fmt(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
