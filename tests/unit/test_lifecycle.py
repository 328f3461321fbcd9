"""The run lifecycle fold every reader shares: what state, step, attempt, liveness and live
hyper-parameters a run's events give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from runtime.lifecycle import STALL_AFTER_SECONDS, Lifecycle, fold, shown
from runtime.publish.sinks import MemorySink, Stamper
from schemas import AuditFlag, CommandResult, Event, Heartbeat, RunFinished, RunNote, RunStarted, RunState, TrainStep

T0 = datetime(2027, 1, 1, tzinfo=UTC)
HP = {
    "learning_rate": 3e-3,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "eval_steps": 100,
    "save_steps": 100,
    "logging_steps": 10,
}


def life_of(*events: Event) -> Lifecycle:
    life = Lifecycle()
    for event in events:
        fold(life, event)
    return life


def started(trainer: Stamper, **fields: Any) -> Event:
    return trainer.emit(
        RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
        hyperparameters=HP, max_steps=100, **fields,
    )  # fmt: skip


def step(trainer: Stamper, n: int, **fields: Any) -> Event:
    return trainer.emit(TrainStep, step=n, epoch=n / 100, loss=1.0, learning_rate=1e-3, **fields)


def test_a_heartbeat_that_trails_the_logged_step_does_not_move_the_step_back() -> None:
    trainer = Stamper(MemorySink(), "r")
    life = life_of(started(trainer), step(trainer, 10), trainer.emit(Heartbeat, step=9, phase="training"))
    assert (life.state, life.step, life.attempt) == ("running", 10, 1)
    fold(life, trainer.emit(Heartbeat, step=12, phase="training"))
    assert life.step == 12  # between logged steps, heartbeats carry the step


def test_a_resumed_attempt_redoes_steps_from_its_checkpoint_and_the_old_attempt_is_ignored() -> None:
    first, second = Stamper(MemorySink(), "r"), Stamper(MemorySink(), "r", attempt=2)
    life = life_of(started(first), step(first, 95), started(second, resumed_from_step=90))
    assert (life.state, life.step, life.attempt) == ("running", 90, 2)
    straggler = first.emit(RunFinished, status="stopped", step=95, reason="fenced: attempt 2 took over")
    assert fold(life, straggler) is False
    assert (life.state, life.finished, life.step) == ("running", False, 90)
    fold(life, second.emit(Heartbeat, step=91, phase="training"))
    assert (life.step, life.attempt) == (91, 2)


def test_finished_is_final_for_its_attempt_and_a_resume_opens_it_again() -> None:
    first = Stamper(MemorySink(), "r")
    life = life_of(started(first), first.emit(RunFinished, status="failed", step=50, error="CUDA out of memory"))
    fold(life, first.emit(RunState, state="running", step=50))  # a racing thread's late state
    assert (life.state, life.finished, life.reason) == ("failed", True, "CUDA out of memory")
    again = Stamper(MemorySink(), "r", attempt=2)
    fold(life, again.emit(Heartbeat, step=40, phase="training"))  # its run.started not seen
    assert (life.state, life.finished, life.step, life.attempt) == ("running", False, 40, 2)


def test_an_applied_set_shows_at_once_and_a_later_command_does_not_hide_it() -> None:
    trainer = Stamper(MemorySink(), "r")
    life = life_of(
        started(trainer),
        step(trainer, 90, hyperparameters=HP),
        trainer.emit(CommandResult, command_id="s", command="set", status="accepted", step=97),
        trainer.emit(
            CommandResult,
            command_id="s",
            command="set",
            status="applied",
            step=98,
            applied={"weight_decay": 0.1, "eval_steps": 50, "current_learning_rate": 2e-4},
        ),
        trainer.emit(CommandResult, command_id="x", command="stop", status="applied", step=100),
    )
    assert life.hyperparameters == {**HP, "weight_decay": 0.1, "eval_steps": 50}
    fold(life, step(trainer, 100, hyperparameters={**HP, "weight_decay": 0.1, "eval_steps": 50}))
    assert life.hyperparameters["eval_steps"] == 50  # the trainer's own report agrees


def test_only_the_current_attempts_trainer_keeps_a_run_alive() -> None:
    trainer, audit = Stamper(MemorySink(), "r"), Stamper(MemorySink(), "r", source="audit")
    user = Stamper(MemorySink(), "r", source="user")
    life = life_of(started(trainer, time=T0), trainer.emit(Heartbeat, step=3, phase="paused", time=T0))
    fold(life, trainer.emit(RunState, state="paused", step=3, time=T0))
    late = T0 + timedelta(seconds=STALL_AFTER_SECONDS + 5)
    fold(
        life, audit.emit(AuditFlag, rule="run_stalled", severity="warning", message="m", judged_event_id="x", time=late)
    )
    fold(life, user.emit(RunNote, text="looks dead", time=late))
    assert life.trainer_time == T0.timestamp() and life.last_event_time == late.timestamp()
    assert shown(life, T0.timestamp() + STALL_AFTER_SECONDS - 1) == "paused"
    assert shown(life, late.timestamp()) == "stalled"
    fold(life, trainer.emit(RunFinished, status="stopped", step=3, time=T0 + timedelta(seconds=1)))
    assert shown(life, late.timestamp() + 3600) == "stopped"  # a finished run is silent by design


def test_events_from_others_change_no_state_and_no_step() -> None:
    trainer, predictor = Stamper(MemorySink(), "r"), Stamper(MemorySink(), "r", source="user", attempt=5)
    life = life_of(started(trainer), step(trainer, 7), predictor.emit(RunNote, text="hi"))
    assert (life.state, life.step, life.attempt) == ("running", 7, 1)
    assert Lifecycle().step is None and shown(Lifecycle(), 0.0) == "unknown"
