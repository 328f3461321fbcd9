"""Restarting `trainbus up` during a run (issue 17): the bus comes back on its port and the trainer
reconnects by itself; when the port was taken meanwhile the bus moves and the trainer follows it
through the folder's bus.json. Every event arrives once, none waits in the outbox."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bus.server import read_state
from tests.end_to_end.conftest import REPO, of_type, wait_events
from tests.integration.test_folder_bus import port_of, up

pytestmark = pytest.mark.slow


def test_restarting_up_mid_run_the_trainer_reconnects_or_follows_and_loses_nothing(tmp_path: Path) -> None:
    run = "restart-run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "runtime.cli", "train", str(REPO / "configs/tiny.yaml"), "--run-id", run]
    for item in (
        "training.max_steps=120", "training.logging_steps=1", "training.eval_steps=null", "training.save_steps=null",
        f"training.output_dir={tmp_path / 'runs'}", f"data.labels_file={REPO / 'configs/labels.yaml'}",
        f"data.train_file={tmp_path / 'data/train.jsonl'}", f"data.validation_file={tmp_path / 'data/validation.jsonl'}",
        f"data.test_file={tmp_path / 'data/test.jsonl'}", "bus.ack_timeout=1",
    ):  # fmt: skip
        argv += ["--set", item]
    log = tmp_path / "train.log"
    trainer: subprocess.Popen[str] | None = None
    blocker = socket.socket()
    try:
        with up(tmp_path, "--no-services"):
            url = read_state(tmp_path / ".trainbus")
            assert url is not None
            # the trainer finds the bus as any command in the folder does: no NATS_URL
            trainer = subprocess.Popen(
                argv, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
            )
            wait_events(url, run, lambda ev: len(of_type(ev, "train.step")) >= 15, timeout=180)
        with up(tmp_path, "--no-services"):  # Ctrl-C, then `trainbus up` again
            assert read_state(tmp_path / ".trainbus") == url
            seen = len(of_type(wait_events(url, run, lambda ev: True), "train.step"))
            wait_events(url, run, lambda ev: len(of_type(ev, "train.step")) >= seen + 15, timeout=120)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port_of(url)))  # something else takes the port while the bus is down
        blocker.listen()
        with up(tmp_path, "--no-services"):
            moved = read_state(tmp_path / ".trainbus")
            assert moved is not None and moved != url
            assert trainer.wait(300) == 0, log.read_text()[-3000:]
            events = wait_events(moved, run, lambda ev: of_type(ev, "run.finished"), timeout=60)
    finally:
        blocker.close()
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # once each, no gaps
    assert [s.step for s in of_type(events, "train.step")] == list(range(1, 121))
    output = log.read_text()
    assert "the bus moved; following it" in output
    assert "still in" not in output  # nothing left in the outbox
