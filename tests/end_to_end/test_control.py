"""Steering a live trainer over NATS: pause, resume, save, evaluate, set, stop, bad input."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from runtime.bus.server import RunningServer
from schemas import CommandReply, control_subject
from tests.end_to_end.conftest import Trainer, ctl, of_type, start_trainer, wait_events

RUN = "ctl-run"
MAX_STEPS = 2000


@pytest.fixture(scope="module")
def live(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    """A trainer that runs until the tests stop it (linear schedule, no warmup, so rates are exact)."""
    tmp = tmp_path_factory.mktemp("ctl")
    trainer = start_trainer(
        nats_server.url, "configs/tiny.yaml", RUN, tmp,
        f"training.max_steps={MAX_STEPS}", "training.warmup_steps=0", "training.logging_steps=2",
        "training.eval_steps=null", "training.save_steps=null", "publish.heartbeat_seconds=0.5",
    )  # fmt: skip
    wait_events(nats_server.url, RUN, lambda ev: of_type(ev, "train.step"), timeout=120)
    yield trainer
    if trainer.process.poll() is None:
        trainer.process.kill()


def test_pause_blocks_training_heartbeats_continue_and_resume_continues(
    nats_server: RunningServer, live: Trainer
) -> None:
    url = nats_server.url
    out = ctl(url, "pause", "--run", RUN, "--wait", "--reason", "inspect")
    assert out.returncode == 0, out.stderr
    paused_at = int(out.stdout.split("applied at step ")[1].split()[0])
    again = ctl(url, "pause", "--run", RUN)
    assert again.returncode == 2 and "not_applicable" in again.stderr
    events = wait_events(url, RUN, lambda ev: len([h for h in of_type(ev, "heartbeat") if h.phase == "paused"]) >= 3)
    assert max(s.step for s in of_type(events, "train.step")) <= paused_at
    assert of_type(events, "run.state")[-1].state == "paused" and of_type(events, "run.state")[-1].step == paused_at
    assert all(h.step == paused_at for h in of_type(events, "heartbeat") if h.phase == "paused")
    save = ctl(url, "save", "--run", RUN, "--wait")
    assert save.returncode == 0, save.stderr
    assert f"checkpoint at step {paused_at}: " in save.stdout and f"checkpoint-{paused_at} (sha256" in save.stdout
    evaluate = ctl(url, "eval", "--run", RUN, "--wait")
    assert evaluate.returncode == 0, evaluate.stderr
    assert f"evaluation at step {paused_at}: step={paused_at} loss=" in evaluate.stdout
    assert "accuracy=" in evaluate.stdout and "macro_f1=" in evaluate.stdout
    events = wait_events(url, RUN, lambda ev: of_type(ev, "checkpoint") and of_type(ev, "eval"))
    assert (
        of_type(events, "checkpoint")[-1].step == paused_at and of_type(events, "checkpoint")[-1].trigger == "command"
    )
    assert of_type(events, "eval")[-1].step == paused_at and of_type(events, "eval")[-1].trigger == "command"
    resume = ctl(url, "resume", "--run", RUN, "--wait")
    assert resume.returncode == 0, resume.stderr
    events = wait_events(url, RUN, lambda ev: max(s.step for s in of_type(ev, "train.step")) > paused_at + 2)
    assert of_type(events, "run.state")[-1].state == "running"


def test_set_learning_rate_keeps_the_schedule_shape(nats_server: RunningServer, live: Trainer) -> None:
    url = nats_server.url
    out = ctl(url, "set", "--run", RUN, "learning_rate=1e-3", "max_grad_norm=0.5", "logging_steps=1", "--wait")
    assert out.returncode == 0, out.stderr
    applied_step = int(out.stdout.split("applied at step ")[1].split()[0])
    applied = json.loads(out.stdout.split("applied at step")[1].split(")", 1)[1])
    expected_now = 1e-3 * (1 - applied_step / MAX_STEPS)
    assert math.isclose(applied["current_learning_rate"], expected_now, rel_tol=1e-6)
    events = wait_events(url, RUN, lambda ev: [s for s in of_type(ev, "train.step") if s.step > applied_step + 2])
    later = [s for s in of_type(events, "train.step") if s.step > applied_step]
    for s in later:
        # the rate logged at step s was used for optimizer step s (before the scheduler advanced)
        assert math.isclose(s.learning_rate, 1e-3 * (1 - (s.step - 1) / MAX_STEPS), rel_tol=1e-6), (
            s.step,
            s.learning_rate,
        )
        assert s.hyperparameters.learning_rate == 1e-3 and s.hyperparameters.max_grad_norm == 0.5
    assert [s.step for s in later[:3]] == list(range(later[0].step, later[0].step + 3))  # logging_steps=1 took effect
    runs = ctl(url, "set", "--run", RUN, "learning_rate=nan")
    assert runs.returncode == 2


def test_same_command_id_is_applied_once(nats_server: RunningServer, live: Trainer) -> None:
    async def twice() -> list[CommandReply]:
        nc = NATS()
        await nc.connect(nats_server.url)
        payload = json.dumps(
            {"type": "save_checkpoint", "command_id": "dup-1", "run_id": RUN, "issued_by": "test"}
        ).encode()
        replies = [
            CommandReply.model_validate_json((await nc.request(control_subject(RUN), payload, timeout=5)).data)
            for _ in range(2)
        ]
        await nc.close()
        return replies

    first, second = asyncio.run(twice())
    assert first == second and first.status == "accepted"
    events = wait_events(
        nats_server.url,
        RUN,
        lambda ev: [r for r in of_type(ev, "command.result") if r.command_id == "dup-1" and r.status == "applied"],
    )
    results = [r for r in of_type(events, "command.result") if r.command_id == "dup-1"]
    assert [r.status for r in results].count("applied") == 1
    assert [r.status for r in results].count("accepted") == 1  # the repeat is answered, not recorded twice


def test_wrong_or_absent_run(nats_server: RunningServer, live: Trainer) -> None:
    out = ctl(nats_server.url, "pause", "--run", "nobody-here", "--timeout", "1")
    assert out.returncode == 3 and "trainbus.control.nobody-here" in out.stderr
    resume = ctl(nats_server.url, "resume", "--run", RUN)
    assert resume.returncode == 2 and "not_applicable" in resume.stderr


JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
VALID = {"type": "set", "command_id": "c", "run_id": RUN, "issued_by": "fuzz", "max_grad_norm": 1.0}


def _mutate(data: Any, key: str, value: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    payload = dict(VALID)
    payload[key] = value
    return json.dumps(payload, allow_nan=True).encode()


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return json.dumps(draw(JSONISH), allow_nan=True).encode()
    key = draw(st.sampled_from([*VALID, "learning_rate", "eval_steps", "weight_decay", "save", "extra"]))
    value = draw(JSONISH | st.sampled_from([-1, 0, float("nan"), float("inf"), "1e-3", 1e9, "pause", "launch"]))
    return _mutate(None, key, value)


def test_fuzzed_commands_never_crash_the_trainer(nats_server: RunningServer, live: Trainer) -> None:
    """>= 1,000 random and mutated payloads: every one answered, none applied, training goes on."""
    answers: list[CommandReply] = []
    loop = asyncio.new_event_loop()
    nc = NATS()
    loop.run_until_complete(nc.connect(nats_server.url))

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payloads())
    def send(payload: bytes) -> None:
        msg = loop.run_until_complete(nc.request(control_subject(RUN), payload, timeout=5))
        reply = CommandReply.model_validate_json(msg.data)
        answers.append(reply)
        assert reply.status in ("accepted", "rejected")

    try:
        send()
    finally:
        loop.run_until_complete(nc.close())
        loop.close()
    assert len(answers) >= 1000
    assert live.process.poll() is None, live.output()[-2000:]
    before = max(s.step for s in of_type(wait_events(nats_server.url, RUN, bool), "train.step"))
    wait_events(nats_server.url, RUN, lambda ev: max(s.step for s in of_type(ev, "train.step")) > before)


def test_stop_saves_and_exits_0(nats_server: RunningServer, live: Trainer, tmp_path: Path) -> None:
    out = ctl(nats_server.url, "stop", "--run", RUN, "--wait", "--reason", "done testing")
    assert out.returncode == 0, out.stderr
    assert live.wait(120) == 0, live.output()[-2000:]
    events = wait_events(nats_server.url, RUN, lambda ev: of_type(ev, "run.finished"))
    finished = of_type(events, "run.finished")[-1]
    assert finished.status == "stopped" and finished.reason == "done testing"
    assert of_type(events, "checkpoint")[-1].step == finished.step
    late = ctl(nats_server.url, "pause", "--run", RUN, "--timeout", "1")
    assert late.returncode == 2
    assert late.stderr.splitlines() == [
        f"trainbus ctl: run {RUN} stopped at step {finished.step}: pause has no trainer to act on"
    ]
