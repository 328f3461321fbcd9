"""The sweep driver on a small machine (#21.7): each trial's share of the cores as torch threads,
a progress line while trials run, and the watch loop's clock."""

from __future__ import annotations

import pytest

from consumers.sweep import cli
from consumers.sweep.clock import EXIT_GRACE, TrialClock
from consumers.sweep.driver import SweepOptions, trial_env
from consumers.sweep.progress import Progress
from consumers.sweep.space import load_space
from runtime.publish.sinks import MemorySink, Stamper
from runtime.settings import PROJECT_ROOT
from schemas import Evaluation, Heartbeat, RunStarted, TrainStep


@pytest.mark.parametrize(("cores", "parallel", "threads"), [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 4, 4), (16, 3, 5)])
def test_each_trial_gets_an_equal_share_of_the_cores(
    cores: int, parallel: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "cores", lambda: cores)
    assert cli.threads_per_trial(parallel) == threads


def test_the_sweep_says_how_trials_share_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.share_line(2) == "each trial uses 1 torch thread (2 cores, 2 at a time)"
    assert cli.share_line(1) == "each trial uses 2 torch threads (2 cores, 1 at a time)"
    assert cli.share_line(4) == (
        "each trial uses 1 torch thread (2 cores, 4 at a time); "
        "--parallel 4 is more than the cores: trials share them and each runs slower"
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.share_line(2) == "each trial uses OMP_NUM_THREADS=3 torch threads (as set); 2 cores"


def test_a_trial_runs_with_its_share_unless_the_user_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = SweepOptions("s", "configs/tiny.yaml", load_space(str(PROJECT_ROOT / "configs/sweeps/tiny.yaml")), 8,
                        parallel=2, bus_url="nats://127.0.0.1:4222", threads=1)  # fmt: skip
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = trial_env(opts)
    assert (env["OMP_NUM_THREADS"], env["NATS_URL"]) == ("1", "nats://127.0.0.1:4222")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert trial_env(opts)["OMP_NUM_THREADS"] == "2"


def test_progress_names_each_trials_step_and_latest_evaluation_every_period() -> None:
    progress = Progress("accuracy", every=10.0)
    t0, t1 = Stamper(MemorySink(), "s-t0"), Stamper(MemorySink(), "s-t1")
    hp = {"learning_rate": 1e-3}
    for number, trainer in ((0, t0), (1, t1)):
        progress.saw(number, trainer.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora",
                                          data_fingerprint="d", hyperparameters=hp, max_steps=400))  # fmt: skip
    progress.saw(0, t0.emit(TrainStep, step=120, epoch=0.5, loss=1.0, learning_rate=1e-3))
    progress.saw(0, t0.emit(Evaluation, step=100, loss=0.9, accuracy=0.6125))
    progress.saw(1, t1.emit(Heartbeat, step=80, phase="training"))
    assert [progress.due(t) for t in (0.0, 5.0, 10.0, 12.0, 20.5)] == [False, False, True, False, True]
    assert progress.line("s", 83.0) == (
        "sweep s at 1m23s: trial 0 step 120/400, accuracy 0.6125 at step 100; trial 1 step 80/400, no evaluation yet"
    )
    progress.drop(0)
    assert progress.line("s", 90.0) == "sweep s at 1m30s: trial 1 step 80/400, no evaluation yet"


def test_the_watch_clock_waits_for_the_last_events_and_the_verdict() -> None:
    clock = TrialClock(100.0, stall_after=60.0, verdict_timeout=30.0)
    assert not clock.renew_due(105.0) and clock.renew_due(110.0) and not clock.renew_due(115.0)
    assert not clock.exited(120.0, None)  # still running
    assert not clock.exited(121.0, 0) and clock.exited(121.0 + EXIT_GRACE, 0)
    assert not clock.verdict_waited(130.0, finished=True) and clock.verdict_waited(160.0, finished=True)
    clock.heard_trainer(200.0)
    assert not clock.silent(259.0) and clock.silent(260.0)
