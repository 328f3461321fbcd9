"""When a run that never said it finished is shown as ``stalled``.

A trainer sends a heartbeat every few seconds while it lives, also while paused or evaluating,
so silence means it died (``kill -9``, a lost node) without publishing ``run.finished``. Every
place that shows a run's state (``trainbus runs``, the exporter, the dashboard) asks this one
function, so they agree on what "stalled" means.
"""

from __future__ import annotations

LIVE_STATES = frozenset({"running", "paused", "stopping"})
"""States of a run whose trainer should still be sending heartbeats."""
STALL_AFTER_SECONDS = 30.0
"""Silence after which a live run counts as stalled (the audit gate's ``run_stalled`` default)."""


def shown_state(state: str, last_event_time: float, now: float, stall_after: float = STALL_AFTER_SECONDS) -> str:
    """``state``, or ``stalled`` when a live run's newest event is more than ``stall_after`` s old.

    Times are Unix seconds; ``last_event_time`` is the newest event of the run's latest attempt.
    A resumed attempt publishes new events, so it replaces a stalled one by itself.
    """
    if state in LIVE_STATES and now - last_event_time > stall_after:
        return "stalled"
    return state
