"""What the sweep driver prints while its trials run: each trial's step and latest evaluation.

Pure: the driver feeds it the events it reads and prints ``line`` when ``due`` says so, about
every 10 s on a terminal and every minute into a log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.cli.render import fmt
from schemas import Evaluation, Event, Heartbeat, JobState, RunStarted, TrainStep

ON_A_TERMINAL = 10.0
IN_A_LOG = 60.0


@dataclass
class TrialProgress:
    """How far one trial's run has come."""

    step: int | None = None
    max_steps: int | None = None
    eval_step: int | None = None
    value: float | None = None
    job: str | None = None
    """The state of its launch job (`trainbus sweep --queue`)."""

    def describe(self, number: int, metric: str) -> str:
        if self.job in ("queued", "requeued"):
            return f"trial {number} waiting for an agent ({self.job})"
        where = "starting" if self.step is None else f"step {self.step}"
        if self.step is not None and self.max_steps:
            where += f"/{self.max_steps}"
        if self.eval_step is None:
            return f"trial {number} {where}, no evaluation yet"
        return f"trial {number} {where}, {metric} {fmt(self.value)} at step {self.eval_step}"


class Progress:
    """Every running trial's progress, and when to say it."""

    def __init__(self, metric: str, every: float = ON_A_TERMINAL) -> None:
        self.metric = metric
        self.every = every
        self.trials: dict[int, TrialProgress] = {}
        self.next_at: float | None = None

    def saw(self, number: int, event: Event) -> None:
        """Take one event of trial ``number``'s run."""
        trial = self.trials.setdefault(number, TrialProgress())
        if isinstance(event, RunStarted):
            trial.max_steps = event.max_steps
        elif isinstance(event, Evaluation):
            value = getattr(event, self.metric, None)
            trial.eval_step = event.step
            trial.value = float(value) if value is not None else math.nan
        elif isinstance(event, JobState):
            trial.job = event.state
        if isinstance(event, TrainStep | Heartbeat | Evaluation):
            trial.step = max(trial.step or 0, event.step)

    def drop(self, number: int) -> None:
        """Trial ``number`` is judged: it is no longer reported."""
        self.trials.pop(number, None)

    def due(self, now: float) -> bool:
        """True once every ``every`` seconds (not at the first call: the trials just started)."""
        if self.next_at is None:
            self.next_at = now + self.every
        if now < self.next_at:
            return False
        self.next_at = now + self.every
        return True

    def line(self, name: str, elapsed: float) -> str:
        minutes, seconds = divmod(int(elapsed), 60)
        trials = "; ".join(t.describe(n, self.metric) for n, t in sorted(self.trials.items()))
        return f"sweep {name} at {minutes}m{seconds:02d}s: {trials or 'no trial running'}"
