"""Where a trial's trainer runs, and what its end says: a process the driver started, a job in the
launch queue (`trainbus sweep --queue`), or neither (a trial adopted from a driver that started its
process: only the stream is left to follow).

``Launched.gone`` says why the trainer can no longer finish the run, ``refusal`` whether it refused
its input (every other trial would too), ``reap`` waits for a process of the driver's own to exit.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path

from consumers.sweep.clock import TrialClock
from consumers.sweep.judge import TrialWatch
from consumers.sweep.queued import REFUSED, job_gone, refused

STOP_GRACE = 60.0
"""Seconds a judged trial's trainer gets to exit by itself before it is sent SIGTERM."""


@dataclass(frozen=True)
class Launched:
    """How a trial's trainer was started: a process of this driver (with its log), a job, or neither."""

    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    job_id: str | None = None

    def gone(self, clock: TrialClock, now: float, watch: TrialWatch) -> str | None:
        """Why the trainer can no longer finish the run, if it cannot: its process exited, its job
        ended (a queued trial: judged by its job, which outlives a lost agent), or (adopted from
        another driver) it has been silent for ``clock.stall_after``."""
        if self.process is not None:
            if clock.exited(now, self.process.poll()):
                return f"trainbus train exited with {self.process.returncode}: {last_line(self.log)}"
            return None
        if self.job_id is not None or watch.job is not None:
            return job_gone(watch.job)
        if clock.silent(now):
            return f"no event from its trainer for {clock.stall_after:g} s (it died without finishing)"
        return None

    def refusal(self, watch: TrialWatch) -> str | None:
        """The trainer's error line when it refused its input (exit 2) before the run started."""
        if self.process is None:
            return refused(watch.job, watch.started)
        return last_line(self.log) if self.process.returncode == REFUSED and not watch.started else None

    async def reap(self) -> None:
        """Wait for a judged trial's trainer process to exit; after ``STOP_GRACE`` ask it to
        (SIGTERM saves and stops). Nothing to wait for without a process of this driver's."""
        process = self.process
        if process is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE
        while process.poll() is None:
            if loop.time() > deadline:
                process.terminate()
                deadline = loop.time() + STOP_GRACE
            await asyncio.sleep(0.5)


def last_line(log: Path | None) -> str:
    """The trainer's own error line from its log (``trainbus train: …``), else its last line."""
    if log is None or not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    mine = [line for line in lines if line.startswith("trainbus train:")]
    return (mine or lines or [""])[-1][:500]
