"""The times one trial's watch decides on: its lease, its trainer's silence or exit, the wait for a verdict.

Pure: the driver passes its loop's monotonic ``now``; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consumers.sweep.study import LEASE_RENEW

EXIT_GRACE = 5.0
"""Seconds after its trainer process exited for the run's last events to reach the driver."""


@dataclass
class TrialClock:
    """When the watch last renewed the trial's lease and heard its trainer; since when the run is
    finished and its trainer process gone."""

    start: float
    stall_after: float
    """Seconds without a trainer event after which an adopted trial (no process to poll) is gone."""
    verdict_timeout: float
    """Seconds after ``run.finished`` to wait for the audit gate's verdict on the last checkpoint."""
    renewed: float = field(init=False)
    heard: float = field(init=False)
    finished_at: float | None = None
    exited_at: float | None = None

    def __post_init__(self) -> None:
        self.renewed = self.heard = self.start

    def renew_due(self, now: float) -> bool:
        """Whether the lease is due for renewal (it then counts as renewed)."""
        if now - self.renewed < LEASE_RENEW:
            return False
        self.renewed = now
        return True

    def heard_trainer(self, now: float) -> None:
        self.heard = now

    def silent(self, now: float) -> bool:
        """No trainer event for ``stall_after`` seconds."""
        return now - self.heard >= self.stall_after

    def exited(self, now: float, returncode: int | None) -> bool:
        """The trainer process (``returncode`` None: still running) exited ``EXIT_GRACE`` seconds ago or more."""
        if returncode is None:
            return False
        if self.exited_at is None:
            self.exited_at = now
        return now - self.exited_at >= EXIT_GRACE

    def verdict_waited(self, now: float, finished: bool) -> bool:
        """The run has been finished for ``verdict_timeout`` seconds: judge it without a verdict."""
        if not finished:
            self.finished_at = None
        elif self.finished_at is None:
            self.finished_at = now
        return self.finished_at is not None and now - self.finished_at >= self.verdict_timeout
