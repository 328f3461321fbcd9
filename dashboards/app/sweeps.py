"""Sweep page builders: pure functions from a sweep's study data and the runs on the bus to the
table and charts the page shows.

The study data is ``consumers.sweep.study.sweep_data`` (plain dicts read from Optuna storage:
objective, parameter scales, one row per trial); the runs are the bus reader's summaries, which
add each running trial's progress. No Streamlit here, as in ``charts`` and ``tables``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from dashboards.app.charts import HEIGHT, Chart
from dashboards.app.snapshot import RunSummary

STATE_COLOURS = {
    "complete": "#2ca02c",
    "running": "#1f77b4",
    "pruned": "#ff7f0e",
    "fail": "#d62728",
    "waiting": "#7f7f7f",
}
"""Trial states in legend order, with their colours (Optuna's states, lower case)."""


def _objective(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trials_table(data: Mapping[str, Any], runs: Mapping[str, RunSummary]) -> pd.DataFrame:
    """One row per trial: state, objective, run (with its step while it trains), every parameter,
    the audit verdict on its last checkpoint and why it was pruned or failed."""
    metric, keys = data["metric"], list(data["parameters"])
    rows = []
    for trial in data["trials"]:
        run = runs.get(trial["run_id"] or "")
        step = "" if run is None else (f"{run.step} / {run.max_steps}" if run.max_steps else str(run.step))
        rows.append(
            {
                "trial": trial["trial"],
                "state": trial["state"],
                metric: _objective(trial["objective"]),
                "run": trial["run_id"] or "",
                "step": step,
                **{key: trial["params"].get(key) for key in keys},
                "verdict": trial["verdict"] or "",
                "reason": trial["reason"] or "",
            }
        )
    return pd.DataFrame(rows, columns=["trial", "state", metric, "run", "step", *keys, "verdict", "reason"])


def _colour() -> dict[str, Any]:
    return {
        "field": "state",
        "type": "nominal",
        "title": "trial",
        "scale": {"domain": list(STATE_COLOURS), "range": list(STATE_COLOURS.values())},
        "legend": {"orient": "bottom"},
    }


def _points(data: Mapping[str, Any]) -> pd.DataFrame:
    """Trials with an objective (complete, and pruned ones at their last report)."""
    rows = [
        {"trial": t["trial"], "objective": _objective(t["objective"]), "state": t["state"], "run": t["run_id"] or ""}
        | {f"param:{k}": v for k, v in t["params"].items()}
        for t in data["trials"]
        if _objective(t["objective"]) is not None
    ]
    return pd.DataFrame(
        rows, columns=["trial", "objective", "state", "run", *(f"param:{k}" for k in data["parameters"])]
    )


def objective_chart(data: Mapping[str, Any]) -> Chart:
    """The objective of every trial, by trial number, coloured by how the trial ended."""
    metric = data["metric"]
    title = f"{metric} per trial ({data['direction']})"
    spec = {
        "title": {"text": title, "anchor": "start"},
        "height": HEIGHT,
        "mark": {"type": "point", "filled": True, "size": 80},
        "encoding": {
            "x": {"field": "trial", "type": "quantitative", "title": "trial", "axis": {"tickMinStep": 1}},
            "y": {"field": "objective", "type": "quantitative", "title": metric, "scale": {"zero": False}},
            "color": _colour(),
            "tooltip": [
                {"field": "trial", "type": "quantitative"},
                {"field": "run", "type": "nominal"},
                {"field": "objective", "type": "quantitative", "title": metric, "format": ".4~g"},
            ],
        },
    }
    return Chart(title, _points(data), spec)


def parameter_chart(data: Mapping[str, Any], key: str) -> Chart:
    """The objective against one parameter: a log axis for a log-sampled range, categories for a choice."""
    metric, scale = data["metric"], data["parameters"][key]
    title = f"{metric} against {key}"
    frame = _points(data).rename(columns={f"param:{key}": "value"})
    x: dict[str, Any] = {"field": "value", "title": key}
    if scale == "nominal":
        x |= {"type": "nominal"}
        frame["value"] = frame["value"].astype(str)  # one Arrow type for a choice of mixed values
    else:
        x |= {"type": "quantitative", "scale": {"type": "log"} if scale == "log" else {"zero": False}}
    spec = {
        "title": {"text": title, "anchor": "start"},
        "height": HEIGHT,
        "mark": {"type": "point", "filled": True, "size": 80},
        "encoding": {
            "x": x,
            "y": {"field": "objective", "type": "quantitative", "title": metric, "scale": {"zero": False}},
            "color": _colour(),
            "tooltip": [
                {"field": "trial", "type": "quantitative"},
                {"field": "value", "title": key},
                {"field": "objective", "type": "quantitative", "title": metric, "format": ".4~g"},
            ],
        },
    }
    return Chart(title, frame[["trial", "value", "objective", "state", "run"]], spec)
