"""SIGTERM saves and stops cleanly; --resume continues the same run; torchrun publishes one stream."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from runtime.natsserver import RunningServer
from tests.end_to_end.conftest import REPO, ctl, of_type, start_trainer, train_argv, trainbus_env, wait_events

STEPS = ["training.warmup_steps=0", "training.logging_steps=2", "training.eval_steps=null", "training.save_steps=null"]


def test_sigterm_saves_then_resume_continues_with_attempt_2(nats_server: RunningServer, tmp_path: Path) -> None:
    url, run = nats_server.url, "sig-run"
    trainer = start_trainer(url, "configs/tiny.yaml", run, tmp_path, "training.max_steps=60", *STEPS)
    wait_events(url, run, lambda ev: len(of_type(ev, "train.step")) >= 2, timeout=120)
    changed = ctl(url, "set", "--run", run, "learning_rate=0.001", "--wait")
    assert changed.returncode == 0, changed.stderr
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.wait(120) == 0, trainer.output()[-2000:]
    first = wait_events(url, run, lambda ev: of_type(ev, "run.finished"))
    finished = of_type(first, "run.finished")[-1]
    assert finished.status == "stopped" and "SIGTERM" in finished.reason
    checkpoint = of_type(first, "checkpoint")[-1]
    assert checkpoint.trigger == "signal" and checkpoint.step == finished.step and Path(checkpoint.path).is_dir()

    resumed = start_trainer(url, "configs/tiny.yaml", run, tmp_path, "training.max_steps=60", *STEPS, resume=True)
    assert resumed.wait(180) == 0, resumed.output()[-2000:]
    events = wait_events(url, run, lambda ev: [e for e in of_type(ev, "run.finished") if e.attempt == 2])
    second = [e for e in events if e.attempt == 2 and e.source == "trainer"]
    assert [e.seq for e in second] == list(range(1, len(second) + 1))
    assert second[0].type == "run.started" and second[0].resumed_from_step == checkpoint.step
    assert second[-1].type == "run.finished" and second[-1].status == "completed" and second[-1].step == 60
    steps = of_type(second, "train.step")
    assert steps[0].step > checkpoint.step  # continued, not restarted
    for s in steps:  # the live learning rate survived the restart, with the scheduler restored
        assert s.hyperparameters.learning_rate == 0.001
        assert math.isclose(s.learning_rate, 0.001 * (1 - (s.step - 1) / 60), rel_tol=1e-6), (s.step, s.learning_rate)


def test_torchrun_two_ranks_publish_one_run(nats_server: RunningServer, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    run = "ddp-run"
    argv = train_argv(
        "configs/tiny.yaml",
        run,
        tmp_path,
        "training.max_steps=8",
        "training.logging_steps=2",
        "training.eval_steps=4",
        "training.save_steps=4",
    )
    argv = [torchrun, "--standalone", "--nproc_per_node", "2", *argv[1:]]
    env = trainbus_env(nats_server.url, OMP_NUM_THREADS="1")
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(f"run {run} (attempt 1) completed") == 1  # only rank 0 owns the bus
    events = wait_events(nats_server.url, run, lambda ev: of_type(ev, "run.finished"))
    trainer_events = [e for e in events if e.source == "trainer"]
    assert [e.seq for e in trainer_events] == list(range(1, len(trainer_events) + 1))
    assert of_type(events, "run.started")[0].world_size == 2
    assert [s.step for s in of_type(events, "train.step")] == [2, 4, 6, 8]
    assert len(of_type(events, "run.started")) == 1 and len(of_type(events, "checkpoint")) == 2
    assert os.path.isdir(of_type(events, "checkpoint")[0].path)
