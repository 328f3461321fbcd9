"""The Compare page's groups: runs grouped by a key (``runtime.groups``), one line per group — its
mean — with a band, and the group table. Pure, like ``charts``: Vega-Lite specs and DataFrames.

A group's curve is drawn from its members' stored points (at most ``RAW_CAP`` a series, spikes
kept) and thinned for the browser the way the Run page thins a run (``spike_preserving``, on the
mean and on both edges of the band, so a spike of the band survives too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dashboards.app.charts import EVAL_CHARTS, HEIGHT, TRAIN_CHARTS, Chart
from dashboards.app.series import DISPLAY_POINTS, spike_preserving
from dashboards.app.snapshot import RunSnapshot, RunSummary
from runtime.groups import Band, Curve, group_curve, group_table, group_value

BAND_NAMES: dict[Band, str] = {"std": "± 1 std", "minmax": "min–max", "ci95": "95 % CI"}


def groups_of(snapshots: Sequence[RunSnapshot], key: str) -> dict[str, list[RunSnapshot]]:
    """The runs grouped by their value of ``key``; runs without one are left out."""
    groups: dict[str, list[RunSnapshot]] = {}
    for snap in snapshots:
        s = snap.summary
        value = group_value(key, s.config, s.tags, s.sweep, s.group)
        if value is not None:
            groups.setdefault(value, []).append(snap)
    return groups


def candidate_keys(summaries: Sequence[RunSummary]) -> list[str]:
    """Keys worth grouping by: config keys whose values differ between runs, tags, and sweep."""
    values: dict[str, set[str]] = {}
    for s in summaries:
        for key, value in _flat(s.config).items():
            values.setdefault(key, set()).add(value)
    differing = sorted(k for k, v in values.items() if len(v) > 1)
    tags = sorted({f"tag:{k}" for s in summaries for k in s.tags})
    special = [
        k for k, has in (("group", any(s.group for s in summaries)), ("sweep", any(s.sweep for s in summaries))) if has
    ]
    return [*special, *differing, *tags]


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def curve_frame(group: str, curve: Curve) -> pd.DataFrame:
    """A group's curve as chart rows, thinned to about ``DISPLAY_POINTS`` with spikes kept."""
    keep = np.arange(len(curve.steps))
    if len(keep) > DISPLAY_POINTS:
        picks = [spike_preserving(curve.steps, y, DISPLAY_POINTS) for y in (curve.mean, curve.low, curve.high)]
        keep = np.unique(np.concatenate(picks))
    return pd.DataFrame(
        {"group": group, "step": curve.steps[keep], "mean": curve.mean[keep], "low": curve.low[keep],
         "high": curve.high[keep], "n": curve.n[keep]}
    )  # fmt: skip


def group_train_chart(groups: Mapping[str, Sequence[RunSnapshot]], name: str, band: Band, *, shared: bool) -> Chart:
    """One ``train.step`` metric: a line per group (its members' mean) with its band."""
    curves = {g: group_curve([snap.series[name] for snap in snaps], band, shared=shared) for g, snaps in groups.items()}
    return _chart(TRAIN_CHARTS[name], curves, band)


def group_eval_chart(groups: Mapping[str, Sequence[RunSnapshot]], name: str, band: Band, *, shared: bool) -> Chart:
    """One eval metric: a line per group with its band (points: evaluations are sparse)."""
    curves = {g: group_curve([_eval_series(snap, name) for snap in snaps], band, shared=shared) for g, snaps in groups.items()}  # fmt: skip
    return _chart(EVAL_CHARTS[name], curves, band, points=True)


def _eval_series(snap: RunSnapshot, name: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(e.step, e.metrics[name]) for e in snap.evals if e.metrics.get(name) is not None]
    steps = np.asarray([p[0] for p in pairs], np.float64)
    return steps, np.asarray([p[1] for p in pairs], np.float64)


def _chart(title: str, curves: Mapping[str, Curve], band: Band, *, points: bool = False) -> Chart:
    frames = [curve_frame(g, c) for g, c in curves.items() if len(c.steps)]
    columns = ["group", "step", "mean", "low", "high", "n"]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})
    return Chart(title, data, band_spec(title, band, points=points))


def band_spec(title: str, band: Band, *, points: bool = False) -> dict[str, Any]:
    """Each group's band as an area and its mean as a line, one colour per group; the tooltip says n."""
    x = {"field": "step", "type": "quantitative", "title": "step"}
    color = {"field": "group", "type": "nominal", "title": "group", "legend": {"orient": "bottom"}}
    tooltip = [
        {"field": "group", "type": "nominal"}, {"field": "step", "type": "quantitative"},
        {"field": "mean", "type": "quantitative", "format": ".4~g"},
        {"field": "low", "type": "quantitative", "format": ".4~g", "title": f"{BAND_NAMES[band]} low"},
        {"field": "high", "type": "quantitative", "format": ".4~g", "title": f"{BAND_NAMES[band]} high"},
        {"field": "n", "type": "quantitative", "title": "runs counted"},
    ]  # fmt: skip
    return {
        "title": {"text": f"{title} (mean, {BAND_NAMES[band]})", "anchor": "start"},
        "height": HEIGHT,
        "layer": [
            {"mark": {"type": "area", "opacity": 0.2},
             "encoding": {"x": x, "y": {"field": "low", "type": "quantitative", "title": None, "scale": {"zero": False}},
                          "y2": {"field": "high"}, "color": color}},
            {"mark": {"type": "line", "point": points},
             "encoding": {"x": x, "y": {"field": "mean", "type": "quantitative"}, "color": color, "tooltip": tooltip}},
        ],
    }  # fmt: skip


def summary_table(groups: Mapping[str, Sequence[RunSnapshot]], key: str) -> pd.DataFrame:
    """Each group's metrics (the runs' step, latest loss and latest eval accuracy): n, mean, std, min, max —
    the table `trainbus runs --group-by KEY` prints."""
    members = {g: {snap.run_id: _metrics(snap.summary) for snap in snaps} for g, snaps in groups.items()}
    rows = [{key: row.pop("group"), **row} for row in group_table(members)]
    return pd.DataFrame(rows, columns=[key, "metric", "runs", "n", "mean", "std", "min", "max"])


def _metrics(s: RunSummary) -> dict[str, float | None]:
    return {"step": float(s.step), "loss": s.loss, "eval_accuracy": s.eval_accuracy}
