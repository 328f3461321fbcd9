"""A queued sweep trial (`trainbus sweep --queue`), without a bus: the job it becomes, the command its
agent runs, and how its job's states decide when the trial is over."""

from __future__ import annotations

from pathlib import Path

from consumers.launch.trainer import train_argv
from consumers.sweep.clock import TrialClock
from consumers.sweep.judge import TrialWatch, handle
from consumers.sweep.launched import Launched
from consumers.sweep.progress import Progress
from consumers.sweep.queued import job_gone, refused, trial_job, waiting
from runtime.settings import PROJECT_ROOT
from schemas.jobs import JobState

TINY = str(PROJECT_ROOT / "configs/tiny.yaml")


def job_state(state: str, *, seq: int = 1, exit_code: int | None = None, reason: str = "") -> JobState:
    return JobState(event_id=f"lr-t3.launch.j-abcd1234.{seq}", run_id="lr-t3", seq=seq, source="launch",
                    job_id="j-abcd1234", state=state, exit_code=exit_code, reason=reason)  # type: ignore[arg-type]  # fmt: skip


def test_a_trial_job_carries_the_config_text_the_values_and_its_sweep_trial_to_every_attempt(tmp_path: Path) -> None:
    spec = trial_job("lr", 3, "lr-t3", TINY, ["training.max_steps=40", "training.learning_rate=0.01"])
    assert (spec.run_id, spec.config_yaml, spec.submitted_by) == ("lr-t3", Path(TINY).read_text(), "sweep:lr")
    assert spec.sweep is not None and (spec.sweep.name, spec.sweep.trial) == ("lr", 3)
    fresh = train_argv(spec, tmp_path / "c.yaml", resume=False)
    resumed = train_argv(spec, tmp_path / "c.yaml", resume=True)
    for argv in (fresh, resumed):  # a trial resumed on another agent is still the same trial
        assert argv[argv.index("--sweep") :][:4] == ["--sweep", "lr", "--trial", "3"]
    assert fresh[-4:] == ["--set", "training.max_steps=40", "--set", "training.learning_rate=0.01"]


def test_a_queued_trial_waits_as_long_as_its_job_and_ends_with_it() -> None:
    watch = TrialWatch("lr-t3", "accuracy", "sweep:lr")
    clock = TrialClock(0.0, stall_after=30.0, verdict_timeout=60.0)
    queued = Launched(job_id="j-abcd1234")
    assert queued.gone(clock, 1000.0, watch) is None  # not seen its job yet: just queued
    for seq, state in enumerate(("queued", "starting", "running", "requeued", "starting", "running"), start=1):
        handle(job_state(state, seq=seq), watch)
        assert queued.gone(clock, 1000.0, watch) is None  # no silence rule: a lost agent's job comes back
        assert waiting(watch.job) == (state in ("queued", "requeued"))
    handle(job_state("cancelled", seq=7, reason="cancelled while waiting"), watch)
    assert queued.gone(clock, 1000.0, watch) == "its job j-abcd1234 cancelled: cancelled while waiting"
    adopted = Launched()  # a trial another driver started as a process: its silence says it is gone
    assert adopted.gone(clock, 29.0, TrialWatch("lr-t0", "accuracy", "sweep:lr")) is None
    assert "no event from its trainer for 30 s" in (adopted.gone(clock, 31.0, TrialWatch("lr-t0", "a", "s")) or "")


def test_only_a_trainer_that_refused_its_input_before_the_run_started_stops_the_sweep() -> None:
    line = "trainbus train: --set training.max_stepz=3: training.max_stepz: unknown key"
    assert refused(job_state("failed", exit_code=2, reason=line), started=False) == line
    assert refused(job_state("failed", exit_code=2, reason=line), started=True) is None  # it ran: this trial's own
    assert refused(job_state("failed", exit_code=1, reason="crashed"), started=False) is None
    assert refused(job_state("failed", exit_code=-9, reason="killed"), started=False) is None
    assert refused(job_state("cancelled"), started=False) is None
    assert job_gone(job_state("running")) is None and job_gone(None) is None


def test_progress_says_a_queued_trial_waits_for_an_agent() -> None:
    progress = Progress("accuracy")
    progress.saw(3, job_state("queued"))
    assert progress.line("lr", 65.0) == "sweep lr at 1m05s: trial 3 waiting for an agent (queued)"
    progress.saw(3, job_state("starting", seq=2))
    assert progress.line("lr", 70.0) == "sweep lr at 1m10s: trial 3 starting, no evaluation yet"
