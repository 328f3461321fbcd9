"""SIGTERM saves and stops cleanly; --resume continues the same run; torchrun and accelerate launch
publish one stream and every rank obeys each command at the same step."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from runtime.bus.server import RunningServer
from tests.end_to_end.conftest import REPO, ctl, of_type, start_trainer, train_argv, trainbus_env, wait_events

STEPS = ["training.warmup_steps=0", "training.logging_steps=2", "training.eval_steps=null", "training.save_steps=null"]


def test_sigterm_saves_then_resume_continues_with_attempt_2(nats_server: RunningServer, tmp_path: Path) -> None:
    url, run = nats_server.url, "sig-run"
    trainer = start_trainer(url, "configs/tiny.yaml", run, tmp_path, "training.max_steps=40", *STEPS)
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

    resumed = start_trainer(url, "configs/tiny.yaml", run, tmp_path, "training.max_steps=40", *STEPS, resume=True)
    assert resumed.wait(180) == 0, resumed.output()[-2000:]
    events = wait_events(url, run, lambda ev: [e for e in of_type(ev, "run.finished") if e.attempt == 2])
    second = [e for e in events if e.attempt == 2 and e.source == "trainer"]
    assert [e.seq for e in second] == list(range(1, len(second) + 1))
    assert second[0].type == "run.started" and second[0].resumed_from_step == checkpoint.step
    assert second[-1].type == "run.finished" and second[-1].status == "completed" and second[-1].step == 40
    steps = of_type(second, "train.step")
    assert steps[0].step > checkpoint.step  # continued, not restarted
    for s in steps:  # the live learning rate survived the restart, with the scheduler restored
        assert s.hyperparameters.learning_rate == 0.001
        assert math.isclose(s.learning_rate, 0.001 * (1 - (s.step - 1) / 40), rel_tol=1e-6), (s.step, s.learning_rate)


def launch_probe(launcher: list[str], url: str, run: str, tmp_path: Path, **extra: str) -> subprocess.Popen[str]:
    """``launcher`` (two processes) running ddp_probe.py: the tiny config, every rank's lr per step."""
    overrides = train_argv("configs/tiny.yaml", run, tmp_path, "training.max_steps=100000", *STEPS)[7:]
    argv = [*launcher, str(REPO / "tests/end_to_end/ddp_probe.py"), str(tmp_path), run]
    argv += [item for item in overrides if item != "--set"]
    env = trainbus_env(url, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_both_ranks_obey_commands(url: str, run: str, tmp_path: Path, proc: subprocess.Popen[str]) -> None:
    """One stream from rank 0; set, pause, resume and stop applied on both ranks at the same step."""
    try:
        wait_events(url, run, lambda ev: len(of_type(ev, "train.step")) >= 2, timeout=180)
        changed = ctl(url, "set", "--run", run, "learning_rate=0.0005", "--wait")
        assert changed.returncode == 0, changed.stderr
        paused = ctl(url, "pause", "--run", run, "--wait")
        assert paused.returncode == 0, paused.stderr
        time.sleep(2.0)  # the pause itself: no rank may take a step during it
        resumed = ctl(url, "resume", "--run", run, "--wait")
        assert resumed.returncode == 0, resumed.stderr
        stopped = ctl(url, "stop", "--run", run, "--wait")
        assert stopped.returncode == 0, stopped.stderr
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert output.count(f"run {run} (attempt 1) stopped") == 1  # only rank 0 owns the bus
    events = wait_events(url, run, lambda ev: of_type(ev, "run.finished"))
    trainer_events = [e for e in events if e.source == "trainer"]
    assert [e.seq for e in trainer_events] == list(range(1, len(trainer_events) + 1))
    assert len(of_type(events, "run.started")) == 1 and of_type(events, "run.started")[0].world_size == 2
    assert len(of_type(events, "checkpoint")) == 1 and os.path.isdir(of_type(events, "checkpoint")[0].path)
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]]
    first_new = [
        next(r["step"] for r in rank if math.isclose(r["lr"], 0.0005 * (1 - r["step"] / 100000), rel_tol=1e-6))
        for rank in ranks
    ]
    assert first_new[0] == first_new[1]
    assert all(
        math.isclose(r["lr"], 0.0005 * (1 - r["step"] / 100000), rel_tol=1e-6)
        for rank in ranks
        for r in rank
        if r["step"] >= first_new[0]
    )
    pause_step = int(paused.stdout.split("applied at step ")[1].split()[0])
    for rank in ranks:
        at = next(i for i, r in enumerate(rank) if r["step"] == pause_step)
        assert rank[at]["time"] - rank[at - 1]["time"] >= 2.0  # both ranks held the pause at that step


def test_torchrun_ranks_publish_one_run_and_obey_commands_at_the_same_step(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    launcher = [torchrun, "--standalone", "--nproc_per_node", "2"]
    proc = launch_probe(launcher, nats_server.url, "ddp-ctl", tmp_path)
    check_both_ranks_obey_commands(nats_server.url, "ddp-ctl", tmp_path, proc)


def test_accelerate_launch_ranks_publish_one_run_and_obey_commands_at_the_same_step(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None
    with socket.socket() as probe:  # a free rendezvous port: accelerate's default 29500 may be taken
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # every option given, so no accelerate config of the developer's (HF_HOME) changes the launch
    launcher = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip
    proc = launch_probe(launcher, nats_server.url, "accel-ctl", tmp_path, HF_HOME=str(tmp_path / "hf"))
    check_both_ranks_obey_commands(nats_server.url, "accel-ctl", tmp_path, proc)
