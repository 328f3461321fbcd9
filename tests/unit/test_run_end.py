"""How a run's last events come out: every command answered, nothing after run.finished, one accepted per id."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerControl, TrainerState, TrainingArguments

from producers.run.callback import TrainbusCallback
from producers.run.control_inbox import ControlChannel
from runtime.publish.sinks import MemorySink
from tests.conftest import wait_until


def command(kind: str, command_id: str, run_id: str = "r") -> bytes:
    return json.dumps({"type": kind, "command_id": command_id, "run_id": run_id, "issued_by": "test"}).encode()


def callback(sink: MemorySink, **kwargs: object) -> TrainbusCallback:
    return TrainbusCallback("r", sink=sink, channel=ControlChannel("r"), **kwargs)  # type: ignore[arg-type]


def test_a_command_accepted_but_never_applied_is_rejected_when_the_run_finishes() -> None:
    sink = MemorySink()
    cb = callback(sink)
    assert cb.channel is not None
    assert json.loads(cb.channel.handle(command("save_checkpoint", "late-save")))["status"] == "accepted"
    cb.finish("completed", 10)
    results = [(e.command_id, e.status, e.code) for e in sink.of_type("command.result")]
    assert results == [("late-save", "accepted", ""), ("late-save", "rejected", "finished")]
    assert sink.events[-1].type == "run.finished"


def test_a_command_answered_after_finish_is_not_published_after_run_finished() -> None:
    sink = MemorySink()
    cb = callback(sink)
    cb.finish("completed", 10)
    assert cb.channel is not None
    reply = json.loads(cb.channel.handle(command("pause", "too-late")))
    assert reply["status"] == "rejected" and reply["code"] == "finished"  # the client is still told
    assert [e.type for e in sink.events] == ["run.finished"]


def test_no_heartbeat_follows_run_finished(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for _ in range(20):  # a heartbeat every 0.1 ms races finish()
        sink = MemorySink()
        cb = callback(sink, heartbeat_seconds=0.0001)
        cb.on_train_begin(args, TrainerState(), TrainerControl())
        wait_until(lambda s=sink: s.of_type("heartbeat"), what="a heartbeat")
        cb.finish("completed", 0)
        assert cb._heartbeat is not None
        cb._heartbeat.join(5)  # whatever it was doing when finish() was called is done now
        assert sink.events[-1].type == "run.finished"


def test_a_repeated_command_id_gets_the_same_reply_and_one_accepted_event() -> None:
    sink = MemorySink()
    cb = callback(sink)
    assert cb.channel is not None
    first, second = cb.channel.handle(command("save_checkpoint", "dup")), cb.channel.handle(command("save_checkpoint", "dup"))  # fmt: skip
    assert first == second and json.loads(first)["status"] == "accepted"
    assert [e.status for e in sink.of_type("command.result")] == ["accepted"]
    assert [c.command_id for c in cb.channel.take()] == ["dup"]  # applied once
