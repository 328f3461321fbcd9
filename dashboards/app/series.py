"""Bounded metric series for the dashboard: a cap on raw points, spikes kept when shrinking.

A 100k-step run must fit in memory and draw quickly, so each series keeps at most ``RAW_CAP``
points: when full, it shrinks itself to half keeping the minimum and the maximum of every
bucket (``tsdownsample``'s MinMax), so a loss spike survives any number of shrinks. A chart
then gets at most ``DISPLAY_POINTS`` points (about one per pixel column) chosen by MinMaxLTTB,
which keeps the shape of the curve and its spikes.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from tsdownsample import MinMaxDownsampler, MinMaxLTTBDownsampler

RAW_CAP = 20_000
"""Raw points kept per series; a longer run is thinned to half this, spikes kept."""
DISPLAY_POINTS = 1_000
"""Points per series sent to the browser for one chart."""
NON_FINITE_CAP = 1_000
"""Steps of non-finite values remembered per series (shown as markers, not as points)."""
_FIRST_CAPACITY = 256

Floats = npt.NDArray[np.float64]


def spike_preserving(x: Floats, y: Floats, n_out: int) -> npt.NDArray[np.intp]:
    """Indices of at most ``n_out`` points of (x, y) for a chart, chosen by MinMaxLTTB; all when fewer.

    ``x`` must be increasing. The minimum and maximum of every bucket are the candidates, and
    LTTB keeps the one that shapes the curve most, so an isolated spike is kept.
    """
    if len(x) <= n_out:
        return np.arange(len(x))
    # MinMaxLTTB can drop an extreme next to the fixed last point (the newest steps, what a live
    # run's chart is watched for); the series' own minimum and maximum are always kept
    chosen = MinMaxLTTBDownsampler().downsample(x, y, n_out=n_out - 2).astype(np.intp)
    return np.unique(np.concatenate([chosen, [np.argmin(y), np.argmax(y)]])).astype(np.intp)


def extremes_kept(x: Floats, y: Floats, n_out: int) -> npt.NDArray[np.intp]:
    """Indices of the minimum and maximum of each of ``n_out // 2`` buckets of x (for shrinking
    stored points: every extreme survives, so repeated shrinking never loses a spike)."""
    if len(x) <= n_out:
        return np.arange(len(x))
    return np.unique(MinMaxDownsampler().downsample(x, y, n_out=n_out - n_out % 2)).astype(np.intp)


class Series:
    """Points (step, value) of one metric, in increasing step order, at most ``cap`` of them.

    A step at or before the last one (a resumed attempt redoing steps) replaces the points
    from that step on. Non-finite values (a NaN loss) cannot be drawn as a line; their steps
    are kept apart in ``non_finite`` so a chart can mark them.
    """

    __slots__ = ("_x", "_y", "cap", "latest", "n", "non_finite")

    def __init__(self, cap: int = RAW_CAP) -> None:
        self.cap = cap
        self.n = 0
        self._x: Floats = np.empty(min(_FIRST_CAPACITY, cap))
        self._y: Floats = np.empty(min(_FIRST_CAPACITY, cap))
        self.non_finite: list[float] = []
        self.latest: float | None = None
        """The newest value appended, NaN included (what a run's "latest loss" shows)."""

    def append(self, x: float, y: float) -> None:
        """Add one point; see the class docstring for going back and for non-finite values."""
        self.latest = y
        if self.n and x <= self._x[self.n - 1]:
            self.truncate_after(x - 1e-9)
        if self.non_finite and x <= self.non_finite[-1]:
            self.non_finite = [s for s in self.non_finite if s < x]
        if not math.isfinite(y):
            self.non_finite.append(x)
            del self.non_finite[:-NON_FINITE_CAP]
            return
        if self.n == len(self._x):
            self._grow_or_shrink()
        self._x[self.n] = x
        self._y[self.n] = y
        self.n += 1

    def truncate_after(self, x: float) -> None:
        """Drop the points after step ``x`` (a resumed attempt starts again from there)."""
        self.n = int(np.searchsorted(self._x[: self.n], x, side="right"))
        self.non_finite = [s for s in self.non_finite if s <= x]

    def _grow_or_shrink(self) -> None:
        if len(self._x) < self.cap:
            size = min(self.cap, 2 * len(self._x))
            self._x = np.resize(self._x, size)
            self._y = np.resize(self._y, size)
            return
        keep = extremes_kept(self._x[: self.n], self._y[: self.n], self.cap // 2)
        k = len(keep)
        self._x[:k] = self._x[keep]
        self._y[:k] = self._y[keep]
        self.n = k

    def arrays(self) -> tuple[Floats, Floats]:
        """Copies of the kept steps and values."""
        return self._x[: self.n].copy(), self._y[: self.n].copy()


def for_display(x: Floats, y: Floats, n_out: int = DISPLAY_POINTS) -> tuple[Floats, Floats]:
    """At most ``n_out`` points of (x, y) for a chart, spikes kept."""
    keep = spike_preserving(x, y, n_out)
    if len(keep) == len(x):
        return x, y
    return x[keep], y[keep]
