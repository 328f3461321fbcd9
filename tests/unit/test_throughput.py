"""samples/s and tokens/s in `train.step` count training time only: a pause, an evaluation or a save
between two logged steps would otherwise read as a throughput drop (and trip TrainbusThroughputDrop).

The callback is driven as the Trainer drives it, with a clock the test moves: each step takes 0.5 s.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

import producers.run.callback
from producers.run.callback import TrainbusCallback
from producers.run.control_inbox import ControlChannel
from runtime.publish.sinks import MemorySink
from tests.conftest import wait_until

RUN = "throughput"
BATCH = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(producers.run.callback.time, "monotonic", fake)
    return fake


class Run:
    """One callback, fed hooks in the Trainer's order."""

    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.clock = clock
        self.sink = MemorySink()
        self.channel = ControlChannel(RUN)
        self.callback = TrainbusCallback(RUN, sink=self.sink, channel=self.channel, heartbeat_seconds=3600)
        self.args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=BATCH, report_to=[], use_cpu=True
        )
        self.state = TrainerState(max_steps=100)
        self.control = TrainerControl()
        self.callback.on_train_begin(self.args, self.state, self.control)

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.clock.now += 0.5
            self.state.global_step += 1
            self.callback.on_step_end(self.args, self.state, self.control)

    def log(self) -> float:
        self.callback.on_log(self.args, self.state, self.control, logs={"loss": 1.0, "learning_rate": 1e-3})
        return float(self.sink.of_type("train.step")[-1].samples_per_second)

    def command(self, kind: str) -> None:
        payload = {"type": kind, "command_id": f"{kind}-{self.state.global_step}", "run_id": RUN, "issued_by": "t"}
        self.channel.handle(json.dumps(payload).encode())


def test_a_pause_between_two_logged_steps_does_not_lower_samples_per_second(tmp_path: Path, clock: Clock) -> None:
    run = Run(tmp_path, clock)
    run.steps(2)
    assert run.log() == 2 * BATCH / 1.0
    run.command("pause")
    later = threading.Thread(target=run.steps, args=(1,))  # the step whose end applies the pause, then waits
    later.start()
    wait_until(lambda: run.callback.paused, what="the pause to be applied")
    clock.now += 120  # two minutes paused
    run.command("resume")
    later.join(10)
    run.steps(1)
    logged = run.log()
    assert logged == pytest.approx(2 * BATCH / 1.0)
    assert run.sink.of_type("train.step")[-1].step_time_seconds == pytest.approx(0.5)


def test_evaluation_and_save_time_is_not_training_time(tmp_path: Path, clock: Clock) -> None:
    run = Run(tmp_path, clock)
    run.steps(2)
    run.log()
    clock.now += 30  # a 30 s evaluation after step 2 ...
    run.callback.on_evaluate(run.args, run.state, run.control, metrics={"eval_loss": 1.0})
    clock.now += 10  # ... and a 10 s save (no folder: nothing to publish, the time still counts)
    run.callback.on_save(run.args, run.state, run.control)
    run.steps(2)
    assert run.log() == pytest.approx(2 * BATCH / 1.0)
