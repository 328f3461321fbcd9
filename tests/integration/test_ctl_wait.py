"""`trainbus ctl … --wait` against a real nats-server and a stand-in trainer that answers like the real
one: eval and save print what they produced; an event ctl cannot read (malformed, or written by a
newer trainbus) is skipped, never a traceback; a misspelt `set` key lists what may be set."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import pytest

from runtime.bus.connect import round_trip
from runtime.bus.server import RunningServer
from runtime.cli.main import main
from runtime.publish.sinks import Stamper
from schemas import Checkpoint, CommandResult, Evaluation, RunFinished, RunStarted, control_subject, event_subject

Script = Callable[[dict[str, Any], Stamper], list[Any]]
"""What the stand-in trainer publishes for a command: bytes (raw, maybe broken) or events."""


@contextmanager
def stand_in_trainer(url: str, run_id: str, script: Script) -> Iterator[None]:
    """Answers ``accepted`` on the run's control subject, then publishes ``script``'s events to JetStream."""
    ready, stop = threading.Event(), threading.Event()
    stamper = Stamper(_Collect(), run_id)

    async def serve() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def on_command(msg: Any) -> None:
            command = json.loads(msg.data)
            reply = {"command_id": command["command_id"], "status": "accepted", "step": 40}
            await msg.respond(json.dumps(reply).encode())
            for i, item in enumerate(script(command, stamper)):
                if isinstance(item, bytes):
                    await js.publish(event_subject(run_id, "command.result"), item, headers={"Nats-Msg-Id": f"raw-{i}"})
                else:
                    data = item.model_dump_json().encode()
                    await js.publish(event_subject(run_id, item.type), data, headers={"Nats-Msg-Id": item.event_id})

        await nc.subscribe(control_subject(run_id), cb=on_command)
        await round_trip(nc)  # the command `ctl` sends next finds the subscription
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(20), "the stand-in trainer did not subscribe"
    try:
        yield
    finally:
        stop.set()
        thread.join(20)


class _Collect:
    def publish(self, event: Any) -> None:
        pass

    def close(self, timeout: float = 10.0) -> Any:
        return None


def _applied(command: dict[str, Any], stamper: Stamper) -> CommandResult:
    return stamper.emit(
        CommandResult, command_id=command["command_id"], command=command["type"], status="applied", step=40
    )


def unreadable_then_eval(command: dict[str, Any], stamper: Stamper) -> list[Any]:
    newer = {"type": "command.result", "event_id": "x.1.9", "run_id": "x", "seq": 9, "schema_version": 99}
    return [
        b"{not json",
        json.dumps({"type": "command.result", "command_id": command["command_id"], "status": "applied"}).encode(),
        json.dumps(
            {**newer, "command_id": command["command_id"], "command": "evaluate", "status": "rejected"}
        ).encode(),
        _applied(command, stamper),
        stamper.emit(Evaluation, step=40, loss=0.52, accuracy=0.91, macro_f1=0.88, trigger="command"),
    ]


def checkpoint_first(command: dict[str, Any], stamper: Stamper) -> list[Any]:
    # paused, the trainer saves before it publishes `applied`
    path = "/runs/r/checkpoint-40"
    ckpt = stamper.emit(Checkpoint, step=40, path=path, sha256="ab" * 32, size_bytes=2048, trigger="command")
    return [ckpt, _applied(command, stamper)]


@pytest.fixture
def bus(nats_server: RunningServer, monkeypatch: pytest.MonkeyPatch, nc: Any) -> str:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return nats_server.url


def test_eval_wait_prints_the_metrics_and_skips_events_it_cannot_read(
    bus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with stand_in_trainer(bus, "ctl-wait-eval", unreadable_then_eval):
        code = main(["ctl", "eval", "--run", "ctl-wait-eval", "--wait", "--wait-timeout", "30"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Traceback" not in out.err
    lines = out.out.splitlines()
    assert lines[0].startswith("eval applied at step 40")  # the action as typed
    assert lines[1] == "evaluation at step 40: step=40 loss=0.52 accuracy=0.91 macro_f1=0.88"


def test_save_wait_prints_the_checkpoint_path(bus: str, capsys: pytest.CaptureFixture[str]) -> None:
    with stand_in_trainer(bus, "ctl-wait-save", checkpoint_first):
        code = main(["ctl", "save", "--run", "ctl-wait-save", "--wait", "--wait-timeout", "30"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines() == [
        out.out.splitlines()[0],
        "checkpoint at step 40: /runs/r/checkpoint-40 (sha256 abababababab…, 2048 bytes)",
    ]
    assert out.out.startswith("save applied at step 40 (command ")


def saved_already(command: dict[str, Any], stamper: Stamper) -> list[Any]:
    # the step was saved before: the trainer writes nothing and points to that checkpoint
    existing = {"checkpoint": "/runs/r/checkpoint-40", "sha256": "cd" * 32, "already_saved": True}
    return [
        stamper.emit(CommandResult, command_id=command["command_id"], command=command["type"], status="applied",
                     step=40, applied=existing)
    ]  # fmt: skip


def test_a_second_save_at_the_same_step_names_the_checkpoint_saved_before(
    bus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with stand_in_trainer(bus, "ctl-wait-saved", saved_already):
        code = main(["ctl", "save", "--run", "ctl-wait-saved", "--wait", "--wait-timeout", "30"])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert lines[0].startswith("save applied at step 40 (command ")
    assert lines[1] == (
        "checkpoint at step 40 was saved already: /runs/r/checkpoint-40 (sha256 cdcdcdcdcdcd…); it is not written again"
    )


def test_a_command_to_a_finished_run_says_how_it_ended(
    nats_server: RunningServer, bus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = "ctl-finished"
    stamper = Stamper(_Collect(), run_id)
    events = [
        stamper.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
                     hyperparameters={"learning_rate": 1e-3}),
        stamper.emit(RunFinished, status="completed", step=40, reason="max_steps reached"),
    ]  # fmt: skip

    async def publish() -> None:
        nc = await nats.connect(bus)
        for event in events:
            await nc.jetstream().publish(
                event_subject(run_id, event.type),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": event.event_id},
            )
        await nc.close()

    asyncio.run(publish())
    assert main(["ctl", "pause", "--run", run_id, "--timeout", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"trainbus ctl: run {run_id} completed at step 40: pause has no trainer to act on"
    ]


def test_a_misspelt_setting_lists_the_ones_that_can_change(bus: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ctl", "set", "--run", "r1", "learnin_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "trainbus ctl: learnin_rate: not a setting that can change while a run trains (did you mean learning_rate?); "
        "settable: learning_rate, max_grad_norm, weight_decay, eval_steps, save_steps, logging_steps"
    ]
