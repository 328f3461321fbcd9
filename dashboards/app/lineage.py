"""A run's family on the Run page: its parent (a fork's), its children (its forks), and the parent's
history drawn under the run's own curves, greyed. Pure: text and Vega-Lite layers from snapshots."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from dashboards.app.charts import Chart
from dashboards.app.snapshot import RunSnapshot, RunSummary
from runtime.cli.render import fmt

PARENT_COLOUR = "#b0b0b0"


def children_of(run_id: str, runs: Iterable[RunSummary]) -> list[RunSummary]:
    """The runs forked from ``run_id``, in the order they started."""
    return sorted((r for r in runs if r.fork is not None and r.fork.parent == run_id), key=lambda r: r.first_event_time)


def parent_line(run: RunSummary) -> str | None:
    """ "Forked from [parent](link) at step N · changed …" (markdown), None for a run started from scratch."""
    if run.fork is None:
        return None
    changes = ", ".join(f"{key} {fmt(c.get('from'))} → {fmt(c.get('to'))}" for key, c in run.fork.changed.items())
    line = f"Forked from [{run.fork.parent}](run?run={run.fork.parent}) at step {run.fork.step}"
    return (
        line
        + (f" · changed {changes}" if changes else " · nothing changed")
        + f" · checkpoint sha256 {run.fork.sha256[:12]}…"
    )


def children_line(children: list[RunSummary]) -> str | None:
    """ "Forks: [c1](link) at step 200, …" (markdown), None when the run has none."""
    if not children:
        return None
    return "Forks: " + ", ".join(f"[{c.run_id}](run?run={c.run_id}) at step {c.fork.step}" for c in children if c.fork)


def with_parent(chart: Chart, parent: RunSnapshot, name: str, until: float) -> Chart:
    """``chart`` with the parent's ``name`` series up to the fork step underneath, in grey."""
    x, y = parent.display.get(name, (np.empty(0), np.empty(0)))
    keep = x <= until
    if not keep.any():
        return chart
    values = [{"step": float(a), "value": float(b)} for a, b in zip(x[keep], y[keep], strict=True)]
    layer: dict[str, Any] = {
        "data": {"values": values},
        "mark": {"type": "line", "color": PARENT_COLOUR, "strokeDash": [2, 2]},
        "encoding": {
            "x": {"field": "step", "type": "quantitative"},
            "y": {"field": "value", "type": "quantitative"},
            "tooltip": [{"field": "step", "type": "quantitative"}, {"field": "value", "type": "quantitative", "format": ".4~g", "title": parent.run_id}],
        },
    }  # fmt: skip
    spec = {**chart.spec, "layer": [layer, *chart.spec.get("layer", [])]}
    return Chart(chart.title, chart.data if len(chart.data) else pd.DataFrame({"step": [], "value": []}), spec)
