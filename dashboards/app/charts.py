"""Chart builders: pure functions from run snapshots to Vega-Lite specs and their data.

Nothing here imports Streamlit: each builder returns a ``Chart`` (a DataFrame and a spec), which
a page hands to ``st.vega_lite_chart`` and a unit test inspects directly. Plain spec dicts rather
than Altair objects: they cost no schema validation on every one-second refresh.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dashboards.app.rows import EvalPoint, Marker
from dashboards.app.snapshot import RunSnapshot

TRAIN_CHARTS: dict[str, str] = {
    "loss": "train loss",
    "learning_rate": "learning rate",
    "grad_norm": "grad norm",
    "tokens_per_second": "tokens/s",
    "samples_per_second": "samples/s",
    "memory_bytes": "memory (MiB)",
}
"""Series name -> chart title, in page order."""
EVAL_CHARTS: dict[str, str] = {
    "loss": "eval loss",
    "perplexity": "perplexity",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "abstain_rate": "abstention rate",
    "ece": "calibration error (ECE)",
    "critical_error_cost": "critical-error cost",
}
"""Eval metric -> chart title, in page order; a run's page draws those its evaluations report."""
MARKER_COLOURS = {
    "command": "#1f77b4",
    "resume": "#2ca02c",
    "flag": "#d62728",
    "non-finite": "#9467bd",
    "note": "#ff7f0e",
    "fork": "#8c564b",
}
_SCALE = {"memory_bytes": 1 / (1 << 20)}
_SI_AXIS = {"tokens_per_second", "samples_per_second", "memory_bytes"}
"""Charts whose axis reads better as 12k than as 1.2e+4 (rates are never milli-anything)."""
HEIGHT = 200


@dataclass(frozen=True)
class Chart:
    """What ``st.vega_lite_chart(chart.data, chart.spec)`` draws."""

    title: str
    data: pd.DataFrame
    spec: dict[str, Any]

    @property
    def points(self) -> int:
        """Rows of data drawn (markers excluded)."""
        return len(self.data)


def _marker_layer(markers: Iterable[Marker]) -> dict[str, Any] | None:
    values = [{"step": m.step, "kind": m.kind, "label": m.label} for m in markers]
    if not values:
        return None
    kinds = [k for k in MARKER_COLOURS if any(v["kind"] == k for v in values)]
    return {
        "data": {"values": values},
        "mark": {"type": "rule", "strokeDash": [4, 3], "opacity": 0.8},
        "encoding": {
            "x": {"field": "step", "type": "quantitative"},
            "color": {
                "field": "kind",
                "type": "nominal",
                "scale": {"domain": kinds, "range": [MARKER_COLOURS[k] for k in kinds]},
                "legend": None,  # the page says what each colour means; a legend per chart costs width
            },
            "tooltip": [
                {"field": "label", "type": "nominal", "title": "what"},
                {"field": "step", "type": "quantitative", "title": "step"},
            ],
        },
    }


def line_spec(
    title: str, *, by: str | None = None, points: bool = False, markers: Iterable[Marker] = (), axis_format: str = "~g"
) -> dict[str, Any]:
    """A line chart of ``value`` over ``step`` (one line per ``by`` value), with marker rules."""
    encoding: dict[str, Any] = {
        "x": {"field": "step", "type": "quantitative", "title": "step"},
        "y": {
            "field": "value",
            "type": "quantitative",
            "title": None,
            "scale": {"zero": False},
            "axis": {"format": axis_format},
        },
        "tooltip": [
            {"field": "step", "type": "quantitative"},
            {"field": "value", "type": "quantitative", "format": ".4~g"},
        ],
    }
    if by is not None:
        encoding["color"] = {"field": by, "type": "nominal", "title": by, "legend": {"orient": "bottom"}}
        encoding["tooltip"].insert(0, {"field": by, "type": "nominal"})
    layers: list[dict[str, Any]] = [{"mark": {"type": "line", "point": points}, "encoding": encoding}]
    rules = _marker_layer(markers)
    if rules is not None:
        layers.append(rules)
    return {
        "title": {"text": title, "anchor": "start"},
        "height": HEIGHT,
        "layer": layers,
        "resolve": {"scale": {"color": "independent"}},
    }


def _markers(snapshot: RunSnapshot, extra: Iterable[Marker] = ()) -> list[Marker]:
    return [*snapshot.markers, *extra]


def train_chart(snapshot: RunSnapshot, name: str) -> Chart:
    """One ``train.step`` metric of a run, thinned for display, with the run's markers."""
    x, y = snapshot.display[name]
    scale = _SCALE.get(name, 1.0)
    data = pd.DataFrame({"step": x, "value": y * scale if scale != 1.0 else y})
    bad = [Marker(step, "non-finite", f"{TRAIN_CHARTS[name]} not finite") for step in snapshot.non_finite[name]]
    title = TRAIN_CHARTS[name]
    axis = "~s" if name in _SI_AXIS else "~g"
    return Chart(title, data, line_spec(title, markers=_markers(snapshot, bad), axis_format=axis))


def eval_frame(evals: Sequence[EvalPoint], name: str) -> pd.DataFrame:
    """``step``/``value`` of one eval metric (finite values only)."""
    rows = [(e.step, e.metrics.get(name)) for e in evals]
    kept = [(s, v) for s, v in rows if v is not None and math.isfinite(v)]
    return pd.DataFrame(kept, columns=["step", "value"]).astype({"step": "float64", "value": "float64"})


def reported(evals: Iterable[EvalPoint]) -> list[str]:
    """The eval metrics (``EVAL_CHARTS`` order) that at least one of ``evals`` reports: a chat
    run's perplexity, a classifier's accuracy and the rest, never an empty chart."""
    evals = list(evals)
    return [
        name for name in EVAL_CHARTS if any((v := e.metrics.get(name)) is not None and math.isfinite(v) for e in evals)
    ]


def eval_chart(snapshot: RunSnapshot, name: str) -> Chart:
    """One eval metric of a run over steps, with the run's markers."""
    title = EVAL_CHARTS[name]
    return Chart(title, eval_frame(snapshot.evals, name), line_spec(title, points=True, markers=snapshot.markers))


def confusion_chart(point: EvalPoint) -> Chart:
    """The confusion matrix of one evaluation as a labelled heatmap (rows: true label)."""
    labels = list(point.labels)
    rows: list[dict[str, Any]] = [
        {"true": labels[i], "predicted": labels[j], "count": int(count)}
        for i, row in enumerate(point.confusion_matrix)
        for j, count in enumerate(row)
        if i < len(labels) and j < len(labels)
    ]
    data = pd.DataFrame(rows, columns=["true", "predicted", "count"])
    most = max((int(r["count"]) for r in rows), default=0)
    axis = {"sort": labels, "type": "nominal"}
    spec = {
        "title": {"text": f"confusion matrix at step {point.step}", "anchor": "start"},
        "height": 60 + 50 * len(labels),
        "encoding": {
            "x": {"field": "predicted", **axis, "title": "predicted"},
            "y": {"field": "true", **axis, "title": "true label"},
        },
        "layer": [
            {
                "mark": "rect",
                "encoding": {
                    "color": {"field": "count", "type": "quantitative", "scale": {"scheme": "blues"}},
                    "tooltip": [
                        {"field": "true", "type": "nominal"},
                        {"field": "predicted", "type": "nominal"},
                        {"field": "count", "type": "quantitative"},
                    ],
                },
            },
            {
                "mark": {"type": "text", "fontSize": 13},
                "encoding": {
                    "text": {"field": "count", "type": "quantitative"},
                    "color": {"condition": {"test": f"datum.count > {most / 2}", "value": "white"}, "value": "black"},
                },
            },
        ],
    }
    return Chart(f"confusion matrix at step {point.step}", data, spec)


def compare_train_chart(snapshots: Sequence[RunSnapshot], name: str) -> Chart:
    """One ``train.step`` metric of several runs overlaid (each thinned for display)."""
    frames = []
    scale = _SCALE.get(name, 1.0)
    for snap in snapshots:
        x, y = snap.display[name]
        frames.append(pd.DataFrame({"run": snap.run_id, "step": x, "value": y * scale}))
    data = _concat(frames)
    title = TRAIN_CHARTS[name]
    return Chart(title, data, line_spec(title, by="run", axis_format="~s" if name in _SI_AXIS else "~g"))


def compare_eval_chart(snapshots: Sequence[RunSnapshot], name: str) -> Chart:
    """One eval metric of several runs overlaid."""
    frames = [eval_frame(snap.evals, name).assign(run=snap.run_id) for snap in snapshots]
    data = _concat(frames)
    title = EVAL_CHARTS[name]
    return Chart(title, data, line_spec(title, by="run", points=True))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"run": pd.Series(dtype=str), "step": np.zeros(0), "value": np.zeros(0)})
    return pd.concat(frames, ignore_index=True)[["run", "step", "value"]]


ABSTAIN = "null"
"""The key of the model's own abstention in an answer's ``probabilities``."""


def probability_chart(probabilities: dict[str, float], decision: str | None) -> Chart:
    """An answer's probability per label (and of abstaining) as horizontal bars, its decision highlighted."""
    rows = [
        {
            "label": "abstain (null)" if name == ABSTAIN else name,
            "probability": float(p),
            "decision": (name == ABSTAIN and decision is None) or name == decision,
        }
        for name, p in probabilities.items()
    ]
    data = pd.DataFrame(rows, columns=["label", "probability", "decision"])
    value = {"field": "probability", "type": "quantitative"}
    spec = {
        "title": {"text": "probability per label", "anchor": "start"},
        "height": {"step": 26},  # one band per label, however many labels the run has
        "encoding": {
            "y": {"field": "label", "type": "nominal", "sort": None, "title": None},
            "x": {**value, "scale": {"domain": [0, 1]}, "axis": {"format": "%"}},
        },
        "layer": [
            {
                "mark": {"type": "bar", "cornerRadiusEnd": 3},
                "encoding": {
                    "color": {"condition": {"test": "datum.decision", "value": "#1f77b4"}, "value": "#c7c7c7"},
                    "tooltip": [{"field": "label", "type": "nominal"}, {**value, "format": ".2%"}],
                },
            },
            {
                "mark": {"type": "text", "align": "left", "dx": 4, "fontSize": 12},
                "encoding": {"text": {**value, "format": ".1%"}},
            },
        ],
    }
    return Chart("probability per label", data, spec)
