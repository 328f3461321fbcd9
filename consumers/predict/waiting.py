"""What ``trainbus serve --run RUN`` says while it has nothing to serve, and when it gives up.

A predictor that follows a run's best approved checkpoint waits for the audit gate to approve
one. While the run trains (or its last checkpoints wait for a verdict) it says so at once and
again every minute; once the run has finished and every checkpoint was judged without an
approval, waiting cannot end: ``nothing_to_serve`` names the verdicts and how to serve one anyway.
Pure functions of a ``RunProgress`` (read from the stream by ``checkpoints.run_progress``) and a
clock object: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SAY_EVERY = 60.0
"""Seconds between two "waiting for …" lines."""


@dataclass(frozen=True)
class RunProgress:
    """What the stream says of the run a predictor waits on."""

    run_id: str
    started: bool = False
    finished: str | None = None
    """``completed``, ``stopped`` or ``failed`` when the run's latest attempt has ended."""
    step: int | None = None
    """The step it finished at, else its latest logged step."""
    verdicts: dict[int, str] = field(default_factory=dict)
    """Each step's newest checkpoint: ``approved``, ``rejected`` or ``pending`` (not judged yet)."""


def _verdicts(progress: RunProgress) -> str:
    return ", ".join(f"step {step} {verdict}" for step, verdict in sorted(progress.verdicts.items()))


def nothing_to_serve(progress: RunProgress) -> str | None:
    """Why a finished run will never have a checkpoint to serve, or None while one may come."""
    if progress.finished is None:
        return None
    ended = f"run {progress.run_id} {progress.finished} at step {progress.step}"
    if not progress.verdicts:
        return f"{ended} without a checkpoint: there is nothing to serve"
    if any(verdict != "rejected" for verdict in progress.verdicts.values()):
        return None  # approved (its best entry is on its way) or still waiting for the audit gate
    last = max(progress.verdicts)
    return (
        f"{ended} and the audit gate approved none of its checkpoints ({_verdicts(progress)}); "
        f"serve one anyway with --step S --force, e.g. trainbus serve --run {progress.run_id} --step {last} --force"
    )


def waiting_line(progress: RunProgress) -> str:
    """What the predictor waits for, in one line."""
    run = progress.run_id
    if not progress.started:
        return f"waiting for run {run} to start, then for the audit gate to approve one of its checkpoints"
    if progress.finished is not None:
        pending = [str(step) for step, v in sorted(progress.verdicts.items()) if v == "pending"]
        which = (
            f"checkpoint at step {pending[0]}" if len(pending) == 1 else f"checkpoints at steps {', '.join(pending)}"
        )
        return (
            f"run {run} {progress.finished} at step {progress.step}; waiting for the audit gate's verdict on its "
            f"{which} (is `trainbus audit` running?)"
        )
    where = f"at step {progress.step}" if progress.step is not None else "starting"
    judged = _verdicts(progress) or "no checkpoint yet"
    return (
        f"waiting for the audit gate to approve a checkpoint of run {run} (training, {where}; {judged}); "
        "serving starts with the first approved one"
    )


class Every:
    """A clock for something said now and then every ``seconds``: ``due(now)`` is True at the first
    call and then once per period (``now`` is the caller's monotonic time)."""

    def __init__(self, seconds: float = SAY_EVERY) -> None:
        self.seconds = seconds
        self.next: float | None = None

    def due(self, now: float) -> bool:
        if self.next is not None and now < self.next:
            return False
        self.next = now + self.seconds
        return True
