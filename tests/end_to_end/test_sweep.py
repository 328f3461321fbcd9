"""`trainbus sweep` end to end: three trials on the tiny config, each a real `trainbus train` run,
judged from the bus by a driver that is killed with -9 half way and started again.

The grid sampler (seed 3) asks learning rates 0.01, 0.003 and 1e-5; the first two run at once.
The first driver is killed once both have evaluated; the second adopts them from the stream
(0.01 reaches accuracy 0, which this test's audit rules reject; 0.003 completes and its
checkpoint is approved), then runs 1e-5, which the median pruner stops at its evaluation at step 20.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest

from producers.task.sampledata import write_sample_data
from runtime.bus.server import start_server
from runtime.settings import ServerSettings
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, of_type, trainbus_env, wait_events

NAME = "sw"
MAX_STEPS = 30
HERE = "tests/end_to_end"

pytestmark = pytest.mark.slow


def sets(tmp: Path) -> list[str]:
    items = [
        f"state_dir={tmp / 'state'}",
        f"training.output_dir={tmp / 'runs'}",
        f"data.train_file={tmp / 'data/train.jsonl'}",
        f"data.validation_file={tmp / 'data/validation.jsonl'}",
        f"training.max_steps={MAX_STEPS}",
        "training.eval_steps=10",
        f"training.save_steps={MAX_STEPS}",
        "training.warmup_steps=0",
        "data.max_eval_samples=64",  # evaluation dominates wall time on 2 cores
    ]
    return [arg for item in items for arg in ("--set", item)]


def sweep_argv(tmp: Path, name: str = NAME, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "runtime.cli", "sweep", "configs/tiny.yaml", "--space", f"{HERE}/sweep_space.yaml"]
    return [*argv, "--trials", "3", "--name", name, *sets(tmp), *extra]


def trainbus(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        cwd=REPO, env=trainbus_env(url), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def storage(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'state' / 'sweeps.db'}"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sweep")
    # its own server: the audit gate below reads every run with the default durable consumer
    server = start_server(ServerSettings(), tmp / "nats", lock=False)
    url = server.url
    write_sample_data(tmp / "data")  # once, before two trainers would both write it
    audit = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "audit", "--rules", f"{HERE}/sweep_audit.yaml"],
        cwd=REPO, env=trainbus_env(url), stdout=subprocess.PIPE, stderr=(tmp / "audit.log").open("w"), text=True,
    )  # fmt: skip
    outputs = {"first": tmp / "first.out", "second": tmp / "second.out"}
    try:
        assert audit.stdout is not None
        assert audit.stdout.readline().startswith("trainbus audit: watching")
        with outputs["first"].open("w") as out:
            first = subprocess.Popen(
                [*sweep_argv(tmp), "--parallel", "2"], cwd=REPO, env=trainbus_env(url), stdout=out, stderr=subprocess.STDOUT
            )  # fmt: skip
        try:
            for trial in (0, 1):  # the driver is watching both runs, one evaluation reported each
                wait_events(url, f"{NAME}-t{trial}", lambda ev: of_type(ev, "eval"), timeout=180)
        finally:
            first.kill()
            first.wait(30)
        with outputs["second"].open("w") as out:
            second = subprocess.run(
                [*sweep_argv(tmp), "--parallel", "1"],
                cwd=REPO, env=trainbus_env(url), stdout=out, stderr=subprocess.STDOUT, timeout=400, check=False,
            )  # fmt: skip
        yield {
            "url": url,
            "tmp": tmp,
            "first": outputs["first"].read_text(),
            "second": outputs["second"].read_text(),
            "code": second.returncode,
        }
    finally:
        text = "".join(p.read_text() for p in outputs.values() if p.exists())
        for pid in re.findall(r"\(pid (\d+),", text):  # trainers live in their own sessions
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(int(pid))
                if "--sweep" in process.cmdline():  # still this sweep's trainer, not a reused pid
                    process.kill()
        audit.terminate()
        audit.wait(20)
        server.stop()


def test_a_driver_killed_with_minus_9_is_continued_by_the_next(sweep: dict[str, Any]) -> None:
    first, second = sweep["first"], sweep["second"]
    assert sweep["code"] == 0, second
    assert "trial 0 (run sw-t0): started" in first and "trial 1 (run sw-t1): started" in first
    assert f"sweep {NAME}: each trial uses OMP_NUM_THREADS=1 torch threads (as set)" in first  # the user's choice wins
    # the second driver does not start them again: it judges the running trials from the stream
    assert "trial 0 (run sw-t0): watching its run from the stream (its driver is gone)" in second
    assert "trial 1 (run sw-t1): watching its run from the stream (its driver is gone)" in second
    assert "sw-t0): started" not in second and "sw-t1): started" not in second
    assert "trial 2 (run sw-t2): started: training.learning_rate=1.0e-05" in second
    assert second.index("trial 0 (run sw-t0): failed") < second.index("trial 2 (run sw-t2): started")
    for trial in range(3):
        starts = of_type(wait_events(sweep["url"], f"{NAME}-t{trial}", lambda ev: ev), "run.started")
        assert [s.attempt for s in starts] == [1]  # one run per trial, never restarted


def test_the_study_is_plain_optuna_with_each_trial_judged(sweep: dict[str, Any]) -> None:
    study = optuna.load_study(study_name=NAME, storage=storage(sweep["tmp"]))
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]
    assert [t.params["training.learning_rate"] for t in trials] == [0.01, 0.003, 1e-5]
    assert [t.user_attrs["run_id"] for t in trials] == ["sw-t0", "sw-t1", "sw-t2"]
    assert trials[0].user_attrs["verdict"] == "rejected"
    assert trials[0].user_attrs["reason"].startswith(f"last checkpoint (step {MAX_STEPS}) rejected: accuracy_floor")
    evals = of_type(wait_events(sweep["url"], "sw-t1", lambda ev: ev), "eval")
    assert trials[1].value == evals[-1].accuracy and evals[-1].step == MAX_STEPS  # the final eval is the objective
    assert trials[1].intermediate_values == {e.step: e.accuracy for e in evals}  # every eval reported
    assert trials[1].user_attrs["verdict"] == "approved"
    assert trials[2].user_attrs["reason"].startswith("pruned at step 20 (accuracy 0)")
    assert study.best_trial.number == 1


def test_each_trial_is_a_run_tagged_with_its_sweep_and_its_sampled_values(sweep: dict[str, Any]) -> None:
    for trial, lr in enumerate((0.01, 0.003, 1e-5)):
        started = of_type(wait_events(sweep["url"], f"{NAME}-t{trial}", lambda ev: ev), "run.started")[0]
        assert started.sweep is not None and (started.sweep.name, started.sweep.trial) == (NAME, trial)
        assert started.config["training"]["learning_rate"] == lr
        assert started.config["training"]["max_steps"] == MAX_STEPS  # --set of the sweep reaches every trial


def test_the_pruned_trial_was_stopped_by_a_recorded_command(sweep: dict[str, Any]) -> None:
    events = wait_events(sweep["url"], "sw-t2", lambda ev: of_type(ev, "run.finished"))
    stops = [r for r in of_type(events, "command.result") if r.command == "stop"]
    assert [r.status for r in stops] == ["accepted", "applied"] and stops[0].issued_by == f"sweep:{NAME}"
    finished = of_type(events, "run.finished")[-1]
    assert finished.status == "stopped" and finished.step < MAX_STEPS
    assert not of_type(events, "checkpoint")  # pruned without saving


def test_the_output_names_the_best_trial_its_parameters_and_approved_checkpoint(sweep: dict[str, Any]) -> None:
    lines = sweep["second"].splitlines()
    best = lines.index(next(line for line in lines if line.startswith("best: ")))
    assert lines[best].startswith("best: trial 1 (run sw-t1): accuracy ")
    assert lines[best + 1] == "  parameters: training.learning_rate=0.003"
    path = lines[best + 2].removeprefix("  approved checkpoint: ")
    assert path == str(sweep["tmp"] / "runs" / "sw-t1" / f"checkpoint-{MAX_STEPS}") and Path(path).is_dir()


def test_sweep_show_prints_every_trial(sweep: dict[str, Any]) -> None:
    shown = trainbus(sweep["url"], "sweep", "show", NAME, "--storage", storage(sweep["tmp"]))
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if re.match(r"^\d+\s", line)}
    assert rows["0"][1:4] == ["fail", "sw-t0", "0.01"]  # a failed trial has no objective
    assert (rows["1"][1], rows["1"][3], rows["1"][4]) == ("complete", "sw-t1", "0.003") and float(rows["1"][2]) > 0
    assert rows["2"][1:5] == ["pruned", "0", "sw-t2", "1e-05"]
    assert "best: trial 1 (run sw-t1)" in shown.stdout
    as_json = trainbus(sweep["url"], "sweep", "show", NAME, "--json", "--set", f"state_dir={sweep['tmp'] / 'state'}")
    states = [json.loads(line)["state"] for line in as_json.stdout.splitlines()]
    assert states == ["fail", "complete", "pruned"]


def test_two_drivers_share_a_study_and_a_refused_value_ends_each_with_its_line(sweep: dict[str, Any]) -> None:
    tmp = sweep["tmp"]
    argv = [*sweep_argv(tmp, "typo"), "--set", "training.max_stepz=3"]  # every trial's trainer refuses it
    drivers = [
        subprocess.Popen(
            argv, cwd=REPO, env=trainbus_env(sweep["url"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [driver.communicate(timeout=180) for driver in drivers]
    asked = set()
    for driver, (out, err) in zip(drivers, outputs, strict=True):
        assert driver.returncode == 2, out + err
        line = err.strip().splitlines()[-1]
        # the trainer's own line, naming the --set item and the key
        assert re.fullmatch(r"trainbus sweep: trial (\d) \(typo-t\1\): trainbus train: --set training\.max_stepz=3: training\.max_stepz: unknown key.*\(did you mean max_steps\?\)", line), line  # fmt: skip
        assert "Traceback" not in err
        asked |= set(re.findall(r"\(run (typo-t\d)\): started", out))
    # one study: each driver asked its own trial, and neither tried the same mistake again
    trials = optuna.load_study(study_name="typo", storage=storage(tmp)).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert asked == {"typo-t0", "typo-t1"} == {t.user_attrs["run_id"] for t in trials}


def test_ctrl_c_stops_the_driver_and_leaves_its_trials_running(sweep: dict[str, Any]) -> None:
    tmp = sweep["tmp"]
    out = tmp / "ctrl-c.out"
    with out.open("w") as handle:
        # its own process group, as a terminal's foreground job
        driver = subprocess.Popen(
            sweep_argv(tmp, "ctrlc"),
            cwd=REPO, env=trainbus_env(sweep["url"]), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    trainer: psutil.Process | None = None
    try:
        started = wait_until(lambda: re.search(r"\(pid (\d+),", out.read_text()), timeout=60, what="a trial to start")
        trainer = psutil.Process(int(started.group(1)))
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C does to the driver's process group
        assert driver.wait(30) == 130
        assert "--sweep" in trainer.cmdline() and trainer.is_running()  # the trial goes on without the driver
    finally:
        if driver.poll() is None:
            driver.kill()
        if trainer is not None:
            with contextlib.suppress(psutil.Error):
                trainer.kill()  # the test's own trainer: no need to train it
    assert out.read_text().splitlines()[-1] == (
        "sweep ctrlc: stopped watching; ctrlc-t0 keep running: the same command again judges them"
    )
    trials = optuna.load_study(study_name="ctrlc", storage=storage(tmp)).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.RUNNING]  # left for the next driver to judge
