"""The Run page's metric tiles: what each one holds, short enough that ``st.metric`` shows it whole.

``st.metric`` cuts a value that does not fit its column ("2 min a…"). The page lays the tiles
out in a row that wraps (each as wide as its content), and keeps each value to ``MOST_CHARS``
characters so that the six fit one row at ordinary widths: numbers in as many significant
digits as fit, an age without "ago" (the label says "since"). Pure: no Streamlit, and the
caller passes ``now``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dashboards.app.snapshot import RunSnapshot
from dashboards.app.tables import age

MOST_CHARS = 7
"""The longest value a tile holds (six such tiles fit one row of a 1,100-pixel-wide page)."""
NONE = "–"


@dataclass(frozen=True)
class Tile:
    """One ``st.metric``: ``note`` is the small grey line under the value (no arrow, no colour)."""

    label: str
    value: str
    note: str | None = None
    help: str | None = None
    key: str | None = None
    """A container key, for the browser test to find the tile."""


def compact(value: float | None, digits: int = 4) -> str:
    """``value`` in at most ``digits`` significant digits, fewer when needed to fit ``MOST_CHARS``
    (``0.00299``, ``1.23e-5``); ``–`` for None."""
    if value is None:
        return NONE
    text = ""
    for places in range(digits, 0, -1):
        text = re.sub(r"e([+-])0*(\d)", r"e\1\2", format(value, f".{places}g"))  # 1e-05 -> 1e-5
        if len(text) <= MOST_CHARS:
            break
    return text


def _learning_rate(snap: RunSnapshot) -> Tile:
    peak = snap.hyperparameters.get("learning_rate")
    return Tile(
        "learning rate",
        compact(snap.summary.learning_rate, 3),
        note=None if peak is None else f"peak {compact(peak, 3)}",
        help="The rate the optimizer uses now (the latest logged step's, where the schedule has brought it); "
        "the peak is the top of the schedule, what `trainbus ctl set learning_rate=…` changes.",
    )


def _best(snap: RunSnapshot) -> Tile:
    run = snap.summary
    if run.best_perplexity is not None and run.best_accuracy is None:  # a chat run
        return Tile("best perplexity", compact(run.best_perplexity))
    return Tile("best accuracy", NONE if run.best_accuracy is None else format(run.best_accuracy, ".3f"))


def _since(snap: RunSnapshot, now: float) -> Tile:
    last = snap.summary.last_event_time
    return Tile(
        "since last event",
        age(now - last) if last else NONE,
        help="How long ago the run's trainer last published: it sends a heartbeat every few seconds while it lives.",
    )


def run_tiles(snap: RunSnapshot, now: float) -> list[Tile]:
    """The six tiles of the Run page's header, in order."""
    run = snap.summary
    return [
        Tile("step", str(run.step), key="live-step"),
        Tile("loss", compact(run.loss)),
        _learning_rate(snap),
        _best(snap),
        Tile("attempt", str(run.attempt), help="1 for a fresh run, +1 on every resume."),
        _since(snap, now),
    ]
