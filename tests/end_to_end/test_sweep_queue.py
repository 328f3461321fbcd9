"""`trainbus sweep --queue` with real processes: two trials of a few steps queued for one agent of one
slot, so the second waits for the first; the driver is killed with -9 meanwhile and the next one
adopts both trials from the stream without queueing them again. Each run is tagged with its sweep
trial and its job; a value every trainer refuses ends the sweep with the trainer's own line.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from nats.aio.client import Client as NATS

from producers.task.sampledata import write_sample_data
from runtime.bus.server import start_server
from runtime.launch.jobs import JobStore
from runtime.settings import ServerSettings
from schemas import Event, JobState, RunFinished, RunStarted
from schemas.jobs import JobRecord
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, ctl, events_of, of_type, pause_on, paused, trainbus_env, wait_events

NAME = "sq"
MAX_STEPS = 10
pytestmark = pytest.mark.slow


def sweep_argv(tmp: Path, name: str, *extra: str) -> list[str]:
    data = tmp / "data"
    sets = [
        f"state_dir={tmp / 'state'}",
        f"training.output_dir={tmp / 'runs'}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.validation_file={data / 'validation.jsonl'}",
        f"training.max_steps={MAX_STEPS}",
        f"training.eval_steps={MAX_STEPS}",
        "training.save_steps=null",  # no checkpoint, so no audit verdict to wait for
        "training.warmup_steps=0",
        "data.max_eval_samples=32",
        *extra,
    ]
    argv = [sys.executable, "-m", "runtime.cli", "sweep", "configs/tiny.yaml", "--space",
            "tests/end_to_end/sweep_space.yaml", "--trials", "2", "--parallel", "2", "--queue", "--name", name]  # fmt: skip
    return argv + [a for item in sets for a in ("--set", item)]


def records(url: str) -> list[JobRecord]:
    async def read() -> list[JobRecord]:
        nc = NATS()
        await nc.connect(url)
        try:
            return await (await JobStore.open(nc.jetstream())).all()
        finally:
            await nc.close()

    return asyncio.run(read())


def first(events: list[Event], kind: type) -> Any:
    return next(e for e in events if isinstance(e, kind))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sweep-queue")
    server = start_server(ServerSettings(), tmp / "nats", lock=False)  # its own: no other test's agent takes a job
    write_sample_data(tmp / "data")
    env = trainbus_env(server.url)
    agent = subprocess.Popen([sys.executable, "-m", "runtime.cli", "agent", "--agent", "a1", "--slots", "1"], cwd=tmp,
                             env=env, stdout=subprocess.PIPE, stderr=(tmp / "agent.log").open("w"), text=True)  # fmt: skip
    out = {"first": tmp / "first.out", "second": tmp / "second.out"}
    try:
        assert agent.stdout is not None and "waiting for jobs" in agent.stdout.readline()
        pausing = pause_on(server.url, f"{NAME}-t0", "run.started")  # trial 0 waits, so the driver dies mid-trial
        with out["first"].open("w") as handle:
            driver = subprocess.Popen(sweep_argv(tmp, NAME), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:  # trial 0 holds the only slot while trial 1 waits for it
            pausing.join(300)
            wait_events(server.url, f"{NAME}-t0", paused)
            wait_events(server.url, f"{NAME}-t1", lambda ev: of_type(ev, "job.state"), timeout=60)
        finally:
            driver.kill()
            driver.wait(30)
        with out["second"].open("w") as handle:
            second = subprocess.Popen(sweep_argv(tmp, NAME), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: out["second"].read_text().count("watching its run from the stream") == 2,
                       timeout=120, what="the second driver to adopt both trials")  # fmt: skip
            assert ctl(server.url, "resume", "--run", f"{NAME}-t0").returncode == 0
            second.wait(300)
        finally:
            if second.poll() is None:
                second.kill()
        yield {"url": server.url, "tmp": tmp, "code": second.returncode, **{k: p.read_text() for k, p in out.items()}}
    finally:
        agent.terminate()
        agent.wait(60)
        server.stop()


def test_a_restarted_driver_adopts_the_running_and_the_waiting_trial_and_judges_both(sweep: dict[str, Any]) -> None:
    first_out, second = sweep["first"], sweep["second"]
    assert sweep["code"] == 0, second
    assert re.search(rf"trial 0 \(run {NAME}-t0\): queued as job j-\w+: training.learning_rate=0.01", first_out)
    assert re.search(rf"trial 1 \(run {NAME}-t1\): queued as job j-\w+: training.learning_rate=0.003", first_out)
    for trial in (0, 1):
        assert f"trial {trial} (run {NAME}-t{trial}): watching its run from the stream (its driver is gone)" in second
    assert "queued as job" not in second  # adopted, not queued again
    # the driver judges a run by its run.finished; its agent marks the job completed once the trainer exits
    done = wait_until(lambda: (found := records(sweep["url"])) and all(r.state == "completed" for r in found) and found,
                      timeout=60, what="both jobs to complete")  # fmt: skip
    jobs = {r.spec.run_id: r for r in done}
    assert sorted(jobs) == [f"{NAME}-t0", f"{NAME}-t1"]  # one job per trial
    assert all((r.agent, r.restarts) == ("a1", 0) for r in jobs.values())
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{sweep['tmp'] / 'state' / 'sweeps.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:
        run_id = trial.user_attrs["run_id"]
        assert trial.user_attrs["job_id"] == jobs[run_id].spec.job_id
        final = of_type(events_of(sweep["url"], run_id), "eval")[-1]
        assert (final.step, trial.value) == (MAX_STEPS, final.accuracy)  # the run's last evaluation is the objective
    assert second.splitlines()[-3].startswith(f"best: trial {study.best_trial.number} (run {NAME}-t")


def test_each_trial_runs_on_the_agent_tagged_with_its_sweep_trial_and_job_one_after_the_other(
    sweep: dict[str, Any],
) -> None:
    events = {t: events_of(sweep["url"], f"{NAME}-t{t}") for t in (0, 1)}
    jobs = {r.spec.run_id: r for r in records(sweep["url"])}
    for trial, lr in ((0, 0.01), (1, 0.003)):
        started: RunStarted = first(events[trial], RunStarted)
        assert started.sweep is not None and (started.sweep.name, started.sweep.trial) == (NAME, trial)
        assert started.launch is not None and started.launch.job_id == jobs[f"{NAME}-t{trial}"].spec.job_id
        assert (
            started.config["training"]["learning_rate"] == lr and started.config["training"]["max_steps"] == MAX_STEPS
        )
    # one slot: trial 1 waited in the queue until trial 0's run had finished
    waited = [e for e in events[1] if isinstance(e, JobState)]
    assert [e.state for e in waited][:2] == ["queued", "starting"]
    assert waited[1].time >= first(events[0], RunFinished).time


def test_a_value_every_trainer_refuses_ends_the_queued_sweep_with_the_trainers_line(sweep: dict[str, Any]) -> None:
    tmp = sweep["tmp"]
    argv = [*sweep_argv(tmp, "typo", "training.max_stepz=3"), "--parallel", "1"]
    done = subprocess.run(argv, cwd=REPO, env=trainbus_env(sweep["url"]), capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"trainbus sweep: trial 0 \(typo-t0\): trainbus train: --set training\.max_stepz=3: training\.max_stepz: unknown key.*", line), line  # fmt: skip
    assert "typo-t1" not in done.stdout  # the same mistake is not queued again
    (job,) = [r for r in records(sweep["url"]) if r.spec.run_id == "typo-t0"]
    assert (job.state, job.exit_code) == ("failed", 2)
