"""`trainbus ctl set learning_rate=…` applied at a logging step: that step's ``train.step`` already
reports the rate the optimizer uses next, not the one the Trainer read before the change.

A tiny Trainer in this process; the commands reach the callback through its control channel (what
the publisher process hands over from ``trainbus.control.<run>``), the pause on step 4, a logging step.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from producers import TrainbusCallback
from producers.run.control_inbox import ControlChannel
from runtime.publish.sinks import MemorySink
from schemas import Pause, Resume, SetHyperparameters, TrainStep

RUN = "live-lr"
PAUSE_AT = 4
NEW_PEAK = 1e-5


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Operator(TrainerCallback):
    """Pauses the run on step ``PAUSE_AT``; once paused, sets the peak and resumes from another
    thread, as `trainbus ctl` would. Records the rate each optimizer step then uses."""

    def __init__(self, channel: ControlChannel, trainbus: TrainbusCallback) -> None:
        self.channel, self.trainbus = channel, trainbus
        self.used: dict[int, float] = {}  # step -> the rate its optimizer step used

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.used[state.global_step + 1] = float(kw["optimizer"].param_groups[0]["lr"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step == PAUSE_AT:
            assert self.channel.submit(Pause(command_id="p", run_id=RUN, issued_by="test")).status == "accepted"
            threading.Thread(target=self._set_and_resume, daemon=True).start()

    def _set_and_resume(self) -> None:
        deadline = time.monotonic() + 60
        while not self.trainbus.paused and time.monotonic() < deadline:
            time.sleep(0.01)
        self.channel.submit(SetHyperparameters(command_id="s", run_id=RUN, issued_by="test", learning_rate=NEW_PEAK))
        time.sleep(0.5)  # the pause loop applies the set on its own before the resume arrives
        self.channel.submit(Resume(command_id="r", run_id=RUN, issued_by="test"))


@pytest.fixture
def run(tmp_path: Path) -> tuple[MemorySink, Operator]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, logging_steps=2, learning_rate=3e-3, warmup_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    sink, channel = MemorySink(), ControlChannel(RUN)
    trainbus = TrainbusCallback(RUN, sink=sink, channel=channel, heartbeat_seconds=60)
    operator = Operator(channel, trainbus)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[operator, trainbus])
    trainbus.trainer = trainer
    trainer.train()
    return sink, operator


def test_the_step_a_set_lands_on_reports_the_rate_the_next_step_uses(run: tuple[MemorySink, Operator]) -> None:
    sink, operator = run
    steps: dict[int, TrainStep] = {e.step: e for e in sink.of_type("train.step")}
    assert sorted(steps) == [2, 4, 6, 8, 10]
    applied = next(e for e in sink.of_type("command.result") if e.command == "set" and e.status == "applied")
    assert applied.step == PAUSE_AT
    # before the set: the rate the step used, the old peak
    assert steps[2].learning_rate == pytest.approx(operator.used[2]) and steps[2].hyperparameters.learning_rate == 3e-3
    # on the step it landed on: the new schedule's rate, which the next optimizer step then used
    assert steps[PAUSE_AT].hyperparameters.learning_rate == NEW_PEAK
    assert steps[PAUSE_AT].learning_rate == pytest.approx(operator.used[PAUSE_AT + 1])
    assert steps[PAUSE_AT].learning_rate == pytest.approx(applied.applied["current_learning_rate"])
    assert steps[PAUSE_AT].learning_rate <= NEW_PEAK
    # and every later step: the rate its optimizer step used, on the new schedule
    for step in (6, 8, 10):
        assert steps[step].learning_rate == pytest.approx(operator.used[step]) and steps[step].learning_rate <= NEW_PEAK
