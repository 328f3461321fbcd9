"""Human-readable one-line summaries of events for `trainbus events` and `trainbus runs`; tables
that wrap their last column on a terminal; events flattened for CSV."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import textwrap
from typing import Any

from schemas import Event


def fmt(value: Any) -> str:
    """Compact number formatting that keeps NaN and inf visible."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


_FIELDS: dict[str, tuple[str, ...]] = {
    "run.started": ("model", "adapter", "world_size", "max_steps"),
    "run.state": ("state", "step", "reason"),
    "run.finished": ("status", "step", "reason", "error"),
    "train.step": ("step", "loss", "learning_rate", "grad_norm", "samples_per_second"),
    "eval": ("step", "loss", "perplexity", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost"),
    "checkpoint": ("step", "path", "size_bytes"),
    "command.result": ("command", "status", "code", "step", "issued_by", "message"),
    "audit.flag": ("rule", "severity", "step", "message"),
    "audit.verdict": ("checkpoint_step", "verdict", "reasons"),
    "heartbeat": ("step", "phase"),
    "predictor.loaded": ("alias", "step", "verdict", "trigger", "instance"),
    "run.tag": ("tags", "issued_by"),
    "run.note": ("text", "issued_by"),
    "job.state": ("job_id", "state", "agent", "gpus", "restarts", "reason"),
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


def terminal_width() -> int | None:
    """The width of the terminal stdout writes to; None when it is a pipe or a file (nothing wraps)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def table(rows: list[dict[str, Any]], columns: list[str], *, width: int | None = None) -> str:
    """A plain aligned text table. With ``width``, the last column wraps onto indented lines to fit."""
    cells = [[fmt(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    indent = sum(widths[:-1]) + 2 * (len(columns) - 1)
    room = max(20, width - indent) if width is not None else None
    if room is not None:
        widths[-1] = min(widths[-1], room)
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        head = "  ".join(v.ljust(w) for v, w in zip(row[:-1], widths[:-1], strict=True))
        last = textwrap.wrap(row[-1], room, break_on_hyphens=False) if room is not None and row[-1] else [row[-1]]
        lines.append(f"{head}  {last[0]}".rstrip() if columns[1:] else last[0])
        lines += [" " * indent + more for more in last[1:]]
    return "\n".join(lines)


def flat(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One level of keys for a CSV row: nested objects become ``a.b`` columns, lists JSON text."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{name}."))
        elif isinstance(value, list | dict):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def write_csv(rows: list[dict[str, Any]], first: list[str]) -> None:
    """Rows as CSV on stdout: ``first`` columns, then every other key in the order first seen."""
    columns = list(first)
    for row in rows:
        columns += [key for key in row if key not in columns]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
