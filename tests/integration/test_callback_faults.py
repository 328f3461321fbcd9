"""The callback in someone's own script: every way the run ends is recorded and flushed, every
accepted command gets an outcome, and a bus that is down never stops the training (issue 16: 5, 6, 10)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from producers import TrainbusCallback
from runtime.bus.server import RunningServer, start_server
from runtime.logs import setup_logging
from runtime.settings import BusSettings, ServerSettings, Settings
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of as stored
from tests.integration.user_script import FailAt, RandomTokens

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests/integration/user_script.py"


def attached(tmp_path: Path, max_steps: int, run_id: str, **settings: Any) -> Trainer:
    """A tiny Trainer with trainbus attached, as a user would add it."""
    trainer = tiny_trainer(tmp_path, max_steps)
    TrainbusCallback.attach(trainer, run_id=run_id, settings=Settings(bus=BusSettings(**settings)))
    return trainer


def tiny_trainer(tmp_path: Path, max_steps: int) -> Trainer:
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=RandomTokens())


def assert_complete(events: list[Any]) -> None:
    """Every event of the attempt once, in order, run.finished last."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run.started" and events[-1].type == "run.finished"


def user_script(mode: str, run_id: str, url: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env.update({"NATS_URL": url, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if mode == "wait":
        # under `make coverage`, coverage's own SIGTERM handler would be the script's, and the
        # callback leaves a handler someone installed alone: the signal test runs unmeasured
        for var in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"):
            env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, run_id, str(tmp_path / "out")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# ---- 5. however the run ends -----------------------------------------------------------


def test_a_crash_inside_train_with_attach_publishes_run_finished_failed(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    trainer = attached(tmp_path, 20, "attach-crash", url=nats_server.url)
    trainer.add_callback(FailAt(4))
    with pytest.raises(RuntimeError, match="failed at step 4"):
        trainer.train()
    events = stored(nats_server.url, "attach-crash")
    assert_complete(events)
    assert events[-1].status == "failed" and events[-1].error == "RuntimeError: the user's code failed at step 4"
    assert events[-1].step == 4


def test_an_uncaught_crash_in_a_users_script_still_ends_the_run_and_sends_everything(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    script = user_script("crash", "script-crash", nats_server.url, tmp_path)
    output, _ = script.communicate(timeout=240)
    assert script.returncode == 1 and "failed at step 150" in output, output[-3000:]
    events = stored(nats_server.url, "script-crash")  # the process is gone: all of it must be stored already
    assert_complete(events)
    assert [e.step for e in events if e.type == "train.step"] == list(range(1, 150))  # it failed before logging 150
    assert events[-1].status == "failed" and events[-1].error == "RuntimeError: the user's code failed at step 150"


def test_sigterm_in_a_users_script_ends_the_run_and_sends_everything(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    script = user_script("wait", "script-term", nats_server.url, tmp_path)
    try:
        wait_until(
            lambda: len([e for e in stored(nats_server.url, "script-term") if e.type == "train.step"]) >= 3,
            timeout=120, what="the script to train",
        )  # fmt: skip
        script.send_signal(signal.SIGTERM)
        output, _ = script.communicate(timeout=60)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 128 + signal.SIGTERM, output[-3000:]
    events = stored(nats_server.url, "script-term")
    assert_complete(events)
    assert events[-1].status == "failed" and events[-1].reason == "received SIGTERM"


# ---- 6. an accepted command is always answered -----------------------------------------


class OperatorAtTheLastStep(TrainerCallback):
    """`trainbus ctl save --wait` arrives after the last step boundary took its commands."""

    def __init__(self, url: str, run_id: str, last: int) -> None:
        self.url, self.run_id, self.last = url, run_id, last
        self.ctl: subprocess.Popen[str] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.last:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        self.ctl = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "ctl", "save", "--run", self.run_id, "--wait", "--wait-timeout", "60"],
            cwd=REPO, env={**env, "NATS_URL": self.url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(
            lambda: [e for e in stored(self.url, self.run_id) if e.type == "command.result" and e.status == "accepted"],
            timeout=60, what="the command to be accepted",
        )  # fmt: skip


def test_a_command_accepted_after_the_last_step_is_answered_and_ctl_says_so(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    trainer = attached(tmp_path, 3, "late-cmd", url=nats_server.url)
    operator = OperatorAtTheLastStep(nats_server.url, "late-cmd", last=3)
    trainer.add_callback(operator)
    trainer.train()
    assert operator.ctl is not None
    out, err = operator.ctl.communicate(timeout=60)
    assert operator.ctl.returncode == 2, (out, err)
    assert "save was accepted but not applied (finished)" in err and "Traceback" not in err
    events = stored(nats_server.url, "late-cmd")
    results = [(e.status, e.code) for e in events if e.type == "command.result"]
    assert results == [("accepted", ""), ("rejected", "finished")]
    assert events[-1].type == "run.finished"


# ---- 10. the bus is down when training starts ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BusComesUp(TrainerCallback):
    """The bus starts at step 3; at step 4 training waits until what was kept offline has reached it."""

    def __init__(self, port: int, store: Path, run_id: str) -> None:
        self.port, self.store, self.run_id = port, store, run_id
        self.server: RunningServer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3:
            self.server = start_server(ServerSettings(port=self.port), self.store, lock=False)
        if state.global_step == 4 and self.server is not None:
            url = self.server.url
            wait_until(lambda: len(stored(url, self.run_id)) >= 4, timeout=60, what="the offline events to be sent")


def test_the_callback_trains_offline_and_sends_everything_once_the_bus_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{port}")  # nothing listens there yet
    setup_logging("info", "json")
    trainer = attached(tmp_path, 6, "offline-cb", connect_timeout=1)
    bus = BusComesUp(port, tmp_path / "nats", "offline-cb")
    trainer.add_callback(bus)
    try:
        trainer.train()
        assert bus.server is not None
        events = stored(bus.server.url, "offline-cb")
    finally:
        if bus.server is not None:
            bus.server.stop()
    assert_complete(events)
    assert [e.step for e in events if e.type == "train.step"] == [1, 2, 3, 4, 5, 6]
    assert events[-1].status == "completed"
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len([line for line in logs if line["event"].startswith("bus unreachable")]) == 1
    assert len([line for line in logs if line["event"].startswith("connected to the bus")]) == 1
