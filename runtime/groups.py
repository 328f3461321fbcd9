"""Groups of runs: which group a run belongs to, each group's curve (a mean with a band) and each
group's table (every metric's mean, std, min and max over its members). Pure (numpy only), so
`trainbus runs --group-by KEY` and the dashboard's Compare page compute the same numbers.

A group is the runs that share a value of a key: a config key (``adapter.r``,
``training.learning_rate``), ``tag:NAME`` (``trainbus tag``), ``sweep``, or ``group`` (the runs
`trainbus train --seeds N` started together). Runs that differ only in their seed are its members.

Curves are aligned on the steps the members logged, never interpolated: at each step the
statistics are over the members that logged that very step, and ``n`` says how many did. By
default only steps every member logged are drawn (``shared``); a member thinned for memory (the
dashboard keeps at most ``RAW_CAP`` points a series) is aligned on a grid as wide as its stride
instead, each member counted once per cell, its mean for the mean and its extremes for the
min–max band, so a spike survives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Band = Literal["std", "minmax", "ci95"]
BANDS: tuple[Band, ...] = ("std", "minmax", "ci95")
GROUP_METRICS = ("step", "loss", "eval_accuracy")
"""What a group's table summarises: each run's step, latest logged loss and latest eval accuracy."""
Floats = npt.NDArray[np.float64]

# two-sided 95 % Student t quantiles for 1..30 degrees of freedom; beyond, the normal's 1.96
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def group_value(
    key: str, config: Mapping[str, Any], tags: Mapping[str, str], sweep: str | None, group: str | None = None
) -> str | None:
    """The value of ``key`` for one run (None: the run has no such value and joins no group)."""
    if key == "sweep":
        return sweep
    if key == "group":
        return group
    if key.startswith("tag:"):
        return tags.get(key[4:])
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return None if isinstance(value, Mapping) else str(value)


def t95(n: int) -> float:
    """The 95 % interval's half-width factor for the mean of ``n`` values (0 for fewer than 2)."""
    if n < 2:
        return 0.0
    return _T95[n - 2] if n - 2 < len(_T95) else 1.96


@dataclass(frozen=True)
class Stats:
    """Mean, sample std, min and max of some values, and how many."""

    n: int
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        arr = np.asarray(finite, dtype=np.float64)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        return cls(len(arr), float(arr.mean()), std, float(arr.min()), float(arr.max()))


def group_table(
    members: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = GROUP_METRICS
) -> list[dict[str, Any]]:
    """One row per group and metric: n, mean, std, min, max over the group's runs.

    ``members`` maps each group value to its runs' metric values (run id → {metric: value}).
    """
    rows = []
    for group in sorted(members, key=_natural):
        runs = members[group]
        for metric in metrics:
            stats = Stats.of(float(values[metric]) for values in runs.values() if values.get(metric) is not None)
            if stats is not None:
                rows.append({"group": group, "metric": metric, "runs": len(runs), **stats.__dict__})
    return rows


@dataclass(frozen=True)
class Curve:
    """A group's curve: at each step the mean, the band's low and high, and the members counted."""

    steps: Floats
    mean: Floats
    low: Floats
    high: Floats
    n: npt.NDArray[np.int64]


def group_curve(series: Sequence[tuple[Floats, Floats]], band: Band = "std", *, shared: bool = True) -> Curve:
    """The mean of the members' series with a ``band``; see the module docstring for alignment."""
    series = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in series if len(x)]
    if not series:
        empty = np.empty(0)
        return Curve(empty, empty, empty, empty, np.empty(0, np.int64))
    cells, low_cells, high_cells = _align(series)
    n = np.sum(~np.isnan(cells), axis=0)
    keep = n >= (len(series) if shared else 1)
    cells, low_cells, high_cells, n = cells[:, keep], low_cells[:, keep], high_cells[:, keep], n[keep]
    steps = _grid(series)[keep]
    mean = np.nanmean(cells, axis=0)
    low, high = _band(band, cells, low_cells, high_cells, mean, n)
    return Curve(steps, mean, low, high, n.astype(np.int64))


def _grid(series: Sequence[tuple[Floats, Floats]]) -> Floats:
    stride = _stride(series)
    return np.unique(np.concatenate([np.floor(x / stride) * stride for x, _ in series]))


def _stride(series: Sequence[tuple[Floats, Floats]]) -> float:
    """1 (exact steps) unless a member was thinned: then the widest gap a thinned member has."""
    widest = 1.0
    for x, _ in series:
        gaps = np.diff(x)
        if len(gaps) and len(np.unique(gaps)) > 1:  # uneven steps: a thinned member
            widest = max(widest, float(np.percentile(gaps, 90)))
    return widest


def _align(series: Sequence[tuple[Floats, Floats]]) -> tuple[Floats, Floats, Floats]:
    """Members × grid cells: each member's mean, min and max in each cell (NaN where it logged nothing)."""
    grid = _grid(series)
    stride = _stride(series)
    shape = (len(series), len(grid))
    mean, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for row, (x, y) in enumerate(series):
        cell = np.searchsorted(grid, np.floor(x / stride) * stride)
        finite = np.isfinite(y)
        cell, y = cell[finite], y[finite]
        counts = np.bincount(cell, minlength=len(grid))
        sums = np.bincount(cell, weights=y, minlength=len(grid))
        seen = counts > 0
        mean[row, seen] = sums[seen] / counts[seen]
        lo, hi = np.full(len(grid), np.inf), np.full(len(grid), -np.inf)
        np.minimum.at(lo, cell, y)
        np.maximum.at(hi, cell, y)
        low[row, seen], high[row, seen] = lo[seen], hi[seen]
    return mean, low, high


def _band(band: Band, cells: Floats, low_cells: Floats, high_cells: Floats, mean: Floats, n: npt.NDArray[Any]) -> tuple[Floats, Floats]:  # fmt: skip
    if band == "minmax":
        return np.nanmin(low_cells, axis=0), np.nanmax(high_cells, axis=0)
    std = np.nanstd(cells, axis=0, ddof=0) * np.sqrt(np.where(n > 1, n / np.maximum(n - 1, 1), 0.0))
    half = std if band == "std" else std / np.sqrt(np.maximum(n, 1)) * np.array([t95(int(k)) for k in n])
    return mean - half, mean + half


def _natural(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then the rest alphabetically (r=8 before r=16)."""
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value
