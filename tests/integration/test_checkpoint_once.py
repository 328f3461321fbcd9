"""A checkpoint, once announced, is never rewritten (#21.1), in a real ``Trainer`` with the trainbus callback.

The sequence a user met: the run paused at a ``save_steps`` boundary; ``ctl save`` wrote
checkpoint-N and published its sha256; ``ctl stop --no-save`` then wrote checkpoint-N again, with
other bytes, so the sha256 the audit gate approved no longer matched the files.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from producers import TrainbusCallback
from producers.run.control_inbox import ControlChannel
from runtime.checkpoints import fingerprint
from runtime.publish.sinks import MemorySink
from tests.conftest import wait_until

RUN = "once"
BOUNDARY = 3


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PauseAt(TrainerCallback):
    """Sends ``pause`` as step ``step`` ends, before the trainbus callback takes its commands there."""

    def __init__(self, channel: ControlChannel, step: int) -> None:
        self.channel, self.step = channel, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.channel.handle(command("pause", "p1"))


def command(kind: str, command_id: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, "command_id": command_id, "run_id": RUN, "issued_by": "test", **fields}).encode()


def applied(sink: MemorySink, command_id: str) -> Any:
    found = [e for e in sink.of_type("command.result") if e.command_id == command_id and e.status == "applied"]
    return found[0] if found else None


def test_save_then_stop_no_save_at_a_save_boundary_keeps_the_announced_checkpoint(tmp_path: Path) -> None:
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2 * BOUNDARY, save_steps=BOUNDARY, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    sink, channel = MemorySink(), ControlChannel(RUN)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[PauseAt(channel, BOUNDARY)])
    TrainbusCallback.attach(trainer, run_id=RUN, sink=sink, channel=channel, heartbeat_seconds=60)
    operator_saw: dict[str, Any] = {}

    def operator() -> None:  # a second shell: save, save again, then stop without saving
        try:
            wait_until(lambda: sink.of_type("run.state"), timeout=120, what="the pause")
            channel.handle(command("save_checkpoint", "s1"))
            wait_until(lambda: applied(sink, "s1") and sink.of_type("checkpoint"), timeout=60, what="the save")
            first = sink.of_type("checkpoint")[0]
            operator_saw["sha_at_save"] = fingerprint(Path(first.path))[0]
            channel.handle(command("save_checkpoint", "s2"))
            wait_until(lambda: applied(sink, "s2"), timeout=60, what="the second save")
        except BaseException as exc:  # pytest.fail in a thread: keep it for the test's own thread
            operator_saw["error"] = exc
        finally:
            channel.handle(command("stop", "stop1", save=False))  # the paused run ends either way

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    trainer.train()
    thread.join(30)
    assert "error" not in operator_saw, operator_saw.get("error")

    checkpoints = sink.of_type("checkpoint")
    assert [(c.step, c.trigger) for c in checkpoints] == [(BOUNDARY, "command")]
    announced = checkpoints[0]
    assert operator_saw["sha_at_save"] == announced.sha256
    assert fingerprint(Path(announced.path))[0] == announced.sha256, "checkpoint-3 was rewritten after it was announced"
    again = applied(sink, "s2")
    assert again.applied == {"checkpoint": announced.path, "sha256": announced.sha256, "already_saved": True}
    finished = sink.of_type("run.finished")[-1]
    assert (finished.status, finished.step) == ("stopped", BOUNDARY)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{BOUNDARY}"]
