"""Table builders: pure functions from snapshots to the DataFrames the pages show.

No Streamlit and no clock here: the caller passes ``now`` (Unix seconds), so a unit test can say
exactly when a run turns ``stalled``. Every run state shown goes through ``runtime.lifecycle``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from dashboards.app.rows import CommandRow, EvalPoint, LoadRow
from dashboards.app.snapshot import RunSnapshot, RunSummary
from dashboards.app.state import EVAL_METRICS
from runtime.lifecycle import RUN_STATES, shown_state

STATES = RUN_STATES
"""Every state a run can be shown in, in filter order."""
STATE_ICONS = {
    "running": ":material/play_circle:",
    "paused": ":material/pause_circle:",
    "stalled": ":material/warning:",
    "stopping": ":material/stop_circle:",
    "completed": ":material/check_circle:",
    "stopped": ":material/stop_circle:",
    "failed": ":material/error:",
    "unknown": ":material/help:",
}
"""Icons for a state in Markdown (page headers); tables show the plain word."""


RUN_LINK = "run?run={}"
"""Where a run's name links to on the Runs page: the Run page (relative, so a dashboard served
under a path prefix links right too)."""
RUN_LINK_TEXT = r"run\?run=(.+)"
"""What a run link shows (its first group: the run id), for ``st.column_config.LinkColumn``."""


def run_link(run_id: str) -> str:
    """The Run page of ``run_id`` (run ids are safe in a URL as they are)."""
    return RUN_LINK.format(run_id)


def state_of(run: RunSummary, now: float) -> str:
    """The state to show for ``run`` at ``now``: its lifecycle state, or ``stalled``."""
    return shown_state(run.state, run.last_event_time, now)


def age(seconds: float) -> str:
    """``4 s``, ``3 min``, ``2 h``, ``5 d``: how long ago, for people."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)


def filter_runs(
    runs: Iterable[RunSummary], now: float, *, states: Sequence[str] = (), name: str = "", sweep: str = ""
) -> list[RunSummary]:
    """Runs whose shown state is one of ``states`` (all when empty), whose id contains ``name`` and
    that are trials of ``sweep`` (any run when empty)."""
    needle = name.strip().lower()
    return [
        r
        for r in runs
        if (not states or state_of(r, now) in states) and needle in r.run_id.lower() and (not sweep or r.sweep == sweep)
    ]


def sweep_names(runs: Iterable[RunSummary]) -> list[str]:
    """The sweeps that runs on the bus are trials of, by name."""
    return sorted({r.sweep for r in runs if r.sweep})


def tags_text(tags: Mapping[str, str]) -> str:
    """``team=risk, dataset=v2``: a run's tags (``trainbus tag``) in one cell."""
    return ", ".join(f"{k}={v}" for k, v in tags.items())


def runs_table(runs: Iterable[RunSummary], now: float) -> pd.DataFrame:
    """The Runs page: one row per run, newest run first (a stable order, so a row stays put
    while the table refreshes under the user's click); ``run`` is the link to the run's page."""
    rows = []
    for r in sorted(runs, key=lambda r: r.first_event_time, reverse=True):
        state = state_of(r, now)
        progress = min(1.0, r.step / r.max_steps) if r.max_steps else None
        rows.append(
            {
                "run": run_link(r.run_id),
                "state": state,
                "progress": progress,
                "step": f"{r.step} / {r.max_steps}" if r.max_steps else str(r.step),
                "loss": _num(r.loss),
                "best accuracy": _num(r.best_accuracy),
                "attempt": r.attempt,
                "checkpoints": f"{r.approved} approved, {r.rejected} rejected"
                + (f", {r.pending} pending" if r.pending else ""),
                "last event": f"{age(now - r.last_event_time)} ago" if r.last_event_time else "",
                "model": f"{r.model} ({r.adapter})" if r.adapter else r.model,
                "sweep": f"{r.sweep} #{r.trial}" if r.sweep else "",
                "tags": tags_text(r.tags),
            }
        )
    columns = [
        "run",
        "state",
        "progress",
        "step",
        "loss",
        "best accuracy",
        "attempt",
        "checkpoints",
        "last event",
        "model",
        "tags",
    ]
    if any(row["sweep"] for row in rows):  # a column for the trials of sweeps only when there are some
        columns.append("sweep")
    return pd.DataFrame(rows, columns=columns)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"lr": 1}}`` → ``{"training.lr": "1"}``; lists as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def config_diff(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Config keys whose values differ between runs (rows), one column per run; missing is blank."""
    flat = {run: flatten(cfg) for run, cfg in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    frame = pd.DataFrame({run: [f.get(k, "") for k in differing] for run, f in flat.items()}, index=differing)
    frame.index.name = "setting"
    return frame


def hyperparameters_table(snapshot: RunSnapshot) -> pd.DataFrame:
    """The run's live hyper-parameters (after every applied ``set``)."""
    items = [
        (k, "" if v is None else f"{v:g}" if isinstance(v, float) else str(v))
        for k, v in snapshot.hyperparameters.items()
    ]
    return pd.DataFrame(items, columns=["hyper-parameter", "value"])


def per_label_table(point: EvalPoint) -> pd.DataFrame:
    """Per-label F1 of one evaluation, in label order."""
    labels = list(point.labels) or sorted(point.per_label_f1)
    return pd.DataFrame({"label": labels, "F1": [point.per_label_f1.get(label) for label in labels]})


def eval_table(evals: Sequence[EvalPoint]) -> pd.DataFrame:
    """Every evaluation of a run, newest first: the metrics some evaluation reports (a chat run
    has no accuracy column) and how many examples it abstained on (a classifier)."""
    metrics = [k for k in EVAL_METRICS if any(e.metrics.get(k) is not None for e in evals)]
    abstained = ["abstained"] if any(e.num_abstained is not None for e in evals) else []
    rows = [
        {
            "step": e.step,
            "trigger": e.trigger,
            **{k: e.metrics.get(k) for k in metrics},
            "examples": e.num_samples,
            "abstained": e.num_abstained,
        }
        for e in reversed(evals)
    ]
    return pd.DataFrame(rows, columns=["step", "trigger", *metrics, "examples", *abstained])


def _result(row: CommandRow) -> str:
    if row.status == "applied":
        return f"applied at step {row.applied_step}"
    if row.status == "accepted":
        return f"accepted at step {row.accepted_step}"
    return f"rejected ({row.code}): {row.message}" if row.code else f"{row.status}: {row.message}"


def commands_table(snapshot: RunSnapshot) -> pd.DataFrame:
    """The run's command history from the stream: who, what, when, result; newest first."""
    rows = []
    for c in sorted(snapshot.commands, key=lambda c: c.time, reverse=True):
        changes = {k: v for k, v in c.applied.items() if not k.startswith("current_")}
        what = c.command + (
            " " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items())
            if c.command == "set" and changes
            else ""
        )
        rows.append({"when": c.time.strftime("%H:%M:%S"), "who": c.issued_by, "what": what, "result": _result(c)})
    return pd.DataFrame(rows, columns=["when", "who", "what", "result"])


def notes_table(snapshot: RunSnapshot) -> pd.DataFrame:
    """The run's notes (``trainbus note``), newest first, with the step the run was at."""
    rows = [
        {"when": n.time.strftime("%Y-%m-%d %H:%M:%S"), "step": n.step, "who": n.issued_by, "note": n.text}
        for n in sorted(snapshot.notes, key=lambda n: n.time, reverse=True)
    ]
    return pd.DataFrame(rows, columns=["when", "step", "who", "note"])


def _metric(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def checkpoints_table(snapshots: Iterable[RunSnapshot]) -> pd.DataFrame:
    """Every checkpoint of the given runs with verdict, reasons, metrics, sha256 and path."""
    rows = []
    for snap in snapshots:
        for c in snap.checkpoints:
            metrics = {**c.metrics, **c.verdict_metrics}
            aliases = sorted({s.alias for s in snap.serving if _same_checkpoint(s, c.event_id, c.sha256)})
            rows.append(
                {
                    "run": snap.run_id,
                    "step": c.step,
                    "attempt": c.attempt,
                    "trigger": c.trigger,
                    "verdict": c.verdict,
                    "best": "★" if c.verdict_event_id is not None and c.verdict_event_id == snap.best_verdict else "",
                    "loaded as": ", ".join(aliases),
                    "reasons": "; ".join(c.reasons),
                    "accuracy": _metric(metrics, "accuracy"),
                    "macro_f1": _metric(metrics, "macro_f1"),
                    "eval loss": _metric(metrics, "loss"),
                    "sha256": c.sha256,
                    "size (MiB)": round(c.size_bytes / (1 << 20), 2),
                    "path": c.path,
                }
            )
    columns = [
        "run",
        "step",
        "attempt",
        "trigger",
        "verdict",
        "best",
        "loaded as",
        "reasons",
        "accuracy",
        "macro_f1",
        "eval loss",
        "sha256",
        "size (MiB)",
        "path",
    ]
    return pd.DataFrame(rows, columns=columns)


def flags_table(snapshots: Iterable[RunSnapshot], severities: Sequence[str] = ()) -> pd.DataFrame:
    """The audit flags of the given runs, newest first, optionally only some severities."""
    flags = [(snap.run_id, f) for snap in snapshots for f in snap.flags if not severities or f.severity in severities]
    flags.sort(key=lambda item: item[1].time, reverse=True)
    rows = []
    for run_id, f in flags:
        rows.append(
            {
                "time": f.time.strftime("%Y-%m-%d %H:%M:%S"),
                "run": run_id,
                "step": f.step,
                "severity": f.severity,
                "rule": f.rule,
                "message": f.message,
                "actions": ", ".join(f.actions_taken),
            }
        )
    return pd.DataFrame(rows, columns=["time", "run", "step", "severity", "rule", "message", "actions"])


def _same_checkpoint(load: LoadRow, event_id: str, sha256: str) -> bool:
    return load.checkpoint_event_id == event_id if load.checkpoint_event_id else load.sha256 == sha256


def _load_row(run_id: str, load: LoadRow) -> dict[str, Any]:
    verdict = load.verdict + (" (--force)" if load.forced else "")
    how = f"hot swap from step {load.previous_step}" if load.trigger == "hot_swap" else "start"
    return {
        "since": load.time.strftime("%Y-%m-%d %H:%M:%S"),
        "alias": load.alias,
        "run": run_id,
        "step": load.step,
        "verdict": verdict,
        "how": how,
        "replica": load.instance,
        "host": load.host,
        "sha256": load.sha256,
    }


LOAD_COLUMNS = ["since", "alias", "run", "step", "verdict", "how", "replica", "host", "sha256"]


def serving_table(snapshots: Iterable[RunSnapshot]) -> pd.DataFrame:
    """Which checkpoint each predictor replica loaded last, under which alias, since when: one row
    per (alias, replica), newest first (``predictor.loaded`` events)."""
    loads = [(snap.run_id, load) for snap in snapshots for load in snap.serving]
    return _loads_frame(loads)


def loads_table(snapshots: Iterable[RunSnapshot]) -> pd.DataFrame:
    """Every ``predictor.loaded`` of the given runs, newest first."""
    return _loads_frame([(snap.run_id, load) for snap in snapshots for load in snap.loads])


def _loads_frame(loads: list[tuple[str, LoadRow]]) -> pd.DataFrame:
    loads = sorted(loads, key=lambda item: item[1].time, reverse=True)
    return pd.DataFrame([_load_row(run_id, load) for run_id, load in loads], columns=LOAD_COLUMNS)
