"""The audit engine without a broker: each rule fires and stays quiet, verdicts, stalls via Tick."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumers.audit.engine import AuditState, Output, Publish, Send, Tick, handle, new_state
from consumers.audit.rules import AuditConfig
from runtime.publish.sinks import MemorySink, Stamper
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    Evaluation,
    Event,
    Heartbeat,
    RunFinished,
    RunStarted,
    TrainStep,
)

NAN = math.nan
T0 = datetime(2026, 1, 1, tzinfo=UTC)
RULES: dict[str, Any] = {
    "non_finite": {"severity": "critical", "actions": ["flag", "reject_checkpoint", "pause_run"]},
    "loss_spike": {"severity": "critical", "actions": ["flag", "reject_checkpoint"], "factor": 3, "window": 4},
    "grad_norm_explosion": {"severity": "warning", "actions": ["flag", "reject_checkpoint"], "threshold": 50},
    "eval_regression": {"severity": "warning", "actions": ["flag"], "metric": "accuracy", "tolerance": 0.05},
    "abstain_rate": {"severity": "warning", "actions": ["flag", "reject_checkpoint"], "max_rate": 0.2},
    "critical_error_cost": {"severity": "critical", "actions": ["flag", "reject_checkpoint"], "threshold": 1.0},
    "calibration": {"severity": "warning", "actions": ["flag"], "max_ece": 0.1},
    "accuracy_floor": {"severity": "warning", "actions": ["flag", "reject_checkpoint"], "min_accuracy": 0.5},
    "text_only": {"severity": "warning", "actions": ["flag", "reject_checkpoint"], "min_accuracy": 0.8,
                  "max_abstain_rate": 0.15},
    "run_stalled": {"severity": "warning", "actions": ["flag"], "seconds": 30},
}  # fmt: skip
GOOD = {"accuracy": 0.9, "abstain_rate": 0.05, "critical_error_cost": 0.1, "ece": 0.05}


def engine(**config: Any) -> AuditState:
    return new_state(AuditConfig.model_validate({"rules": RULES, **config}))


class Run:
    """Stamps trainer events of one run, as the trainer would."""

    def __init__(self, run_id: str = "r1", attempt: int = 1) -> None:
        self.stamper = Stamper(MemorySink(), run_id, attempt)

    def step(self, step: int, loss: float = 1.0, grad_norm: float | None = 1.0) -> Event:
        return self.stamper.emit(TrainStep, step=step, epoch=0.0, loss=loss, learning_rate=1e-3, grad_norm=grad_norm)

    def eval(self, step: int, loss: float = 0.5, **metrics: float) -> Event:
        return self.stamper.emit(Evaluation, step=step, loss=loss, **{**GOOD, **metrics})

    def ckpt(self, step: int) -> Event:
        return self.stamper.emit(
            Checkpoint, step=step, path=f"/runs/r1/checkpoint-{step}", sha256="0" * 64, size_bytes=1
        )

    def beat(self, step: int, at: datetime) -> Event:
        return self.stamper.emit(Heartbeat, step=step, phase="training", time=at)

    def started(self) -> Event:
        hp = {"learning_rate": 1e-3}
        return self.stamper.emit(
            RunStarted, config={}, config_hash="h", model="m", adapter="lora", data_fingerprint="d", hyperparameters=hp
        )


def feed(state: AuditState, *events: Event | Tick) -> list[Output]:
    out: list[Output] = []
    for event in events:
        state, outputs = handle(event, state)
        out += outputs
    return out


def flags(outputs: list[Output]) -> list[AuditFlag]:
    return [o.event for o in outputs if isinstance(o, Publish) and isinstance(o.event, AuditFlag)]


def verdicts(outputs: list[Output]) -> list[AuditVerdict]:
    return [o.event for o in outputs if isinstance(o, Publish) and isinstance(o.event, AuditVerdict)]


def healthy(run: Run, steps: range) -> list[Event]:
    return [run.step(s, loss=1.0) for s in steps]


# ---- train.step rules --------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "grad_norm"), [(NAN, 1.0), (math.inf, 1.0), (1.0, NAN), (1.0, -math.inf)])
def test_non_finite_fires_once_per_episode_pauses_and_clears(loss: float, grad_norm: float) -> None:
    state, run = engine(), Run()
    bad = run.step(3, loss=loss, grad_norm=grad_norm)
    out = feed(state, run.step(1), run.step(2), bad, run.step(4, loss=loss, grad_norm=grad_norm))
    [flag] = flags(out)
    assert (flag.rule, flag.severity, flag.step, flag.judged_event_id) == ("non_finite", "critical", 3, bad.event_id)
    assert flag.event_id == f"r1.audit.non_finite.{bad.event_id}"
    assert flag.actions == ["flag", "reject_checkpoint", "pause_run"]
    assert [o.commands for o in out if isinstance(o, Publish)] == [("pause",)]
    again = run.step(6, loss=loss, grad_norm=grad_norm)
    assert flags(feed(state, run.step(5), again))[0].judged_event_id == again.event_id  # new episode


def test_stop_run_sends_stop() -> None:
    rules = {**RULES, "non_finite": {"severity": "critical", "actions": ["flag", "stop_run"]}}
    state, run = new_state(AuditConfig.model_validate({"rules": rules})), Run()
    [publish] = feed(state, run.step(1, loss=NAN))
    assert isinstance(publish, Publish) and publish.commands == ("stop",)


def test_non_finite_quiet_for_finite_values_and_missing_grad_norm() -> None:
    state, run = engine(), Run()
    assert flags(feed(state, run.step(1, loss=1e9, grad_norm=None), run.step(2, loss=0.0, grad_norm=0.0))) == []


def test_loss_spike_against_moving_average_of_healthy_losses() -> None:
    state, run = engine(), Run()
    assert flags(feed(state, *healthy(run, range(1, 5)), run.step(5, loss=2.9))) == []  # 2.9 < 3 x 1.0
    spike = run.step(6, loss=30.0)
    [flag] = flags(feed(state, spike))
    assert flag.rule == "loss_spike" and flag.value == 30.0
    assert flag.message == (
        "loss rose to 30 at step 6, 20.3 times the average 1.48 of the previous 4 logged losses (the limit is 3 times)"
    )
    assert flag.threshold is not None and 3.0 < flag.threshold < 6.0
    # the blow-up stays one episode (the spike does not raise the average), then recovers
    assert flags(feed(state, run.step(7, loss=50.0), run.step(8, loss=1.0))) == []
    assert [f.step for f in flags(feed(state, run.step(9, loss=40.0)))] == [9]


def test_loss_spike_needs_a_full_window_and_min_increase() -> None:
    state, run = engine(), Run()
    assert flags(feed(state, run.step(1, loss=1.0), run.step(2, loss=9.0))) == []  # window of 4 not full yet
    rules = {**RULES, "loss_spike": {**RULES["loss_spike"], "min_increase": 1.0}}
    state, run = new_state(AuditConfig.model_validate({"rules": rules})), Run()
    tiny = [run.step(s, loss=0.01) for s in range(1, 5)]
    assert flags(feed(state, *tiny, run.step(5, loss=0.5))) == []  # 50x, but only +0.49


def test_grad_norm_explosion_above_threshold_only() -> None:
    state, run = engine(), Run()
    assert flags(feed(state, run.step(1, grad_norm=50.0))) == []
    [flag] = flags(feed(state, run.step(2, grad_norm=51.0)))
    assert (flag.rule, flag.severity, flag.value, flag.threshold) == ("grad_norm_explosion", "warning", 51.0, 50.0)
    out = feed(state, run.step(3, grad_norm=1.0), run.step(4, grad_norm=99.0))
    assert [o.commands for o in out if isinstance(o, Publish)] == [()]  # a warning never pauses


# ---- eval rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "bad", "ok"),
    [
        ("abstain_rate", {"abstain_rate": 0.25}, {"abstain_rate": 0.2}),
        ("critical_error_cost", {"critical_error_cost": 1.5}, {"critical_error_cost": 1.0}),
        ("calibration", {"ece": 0.2}, {"ece": 0.1}),
        ("accuracy_floor", {"accuracy": 0.4}, {"accuracy": 0.5}),
        ("non_finite", {"loss": NAN}, {"loss": 0.3}),
        ("text_only", {"text_only_accuracy": 0.79}, {"text_only_accuracy": 0.8}),
        (
            "text_only",
            {"text_only_accuracy": 0.9, "text_only_abstain_rate": 0.2},
            {"text_only_accuracy": 0.9, "text_only_abstain_rate": 0.15},
        ),
    ],
)
def test_eval_threshold_rules_fire_and_stay_quiet(rule: str, bad: dict[str, float], ok: dict[str, float]) -> None:
    state, run = engine(), Run()
    assert flags(feed(state, run.eval(10, **ok))) == []
    [flag] = [f for f in flags(feed(state, run.eval(20, **bad))) if f.rule == rule]
    assert flag.step == 20 and flag.severity == RULES[rule]["severity"]


def test_a_model_that_only_answers_with_its_metadata_is_not_approved() -> None:
    state, run = engine(), Run()
    full = {"accuracy": 1.0, "abstain_rate": 0.05}
    [verdict] = verdicts(
        feed(state, run.eval(10, **full, text_only_accuracy=0.34, text_only_abstain_rate=0.28), run.ckpt(10))
    )
    assert verdict.verdict == "rejected"
    assert verdict.reasons == [
        "text_only (warning): asked with the text alone, accuracy was 0.34 at step 10, below the minimum of 0.8"
    ]
    assert verdict.metrics["text_only_accuracy"] == 0.34  # the bucket's record and the exporter see it too
    [fine] = verdicts(
        feed(state, run.eval(20, **full, text_only_accuracy=0.97, text_only_abstain_rate=0.06), run.ckpt(20))
    )
    assert fine.verdict == "approved"
    # an eval of a trainer that does not measure it (or a chat run) is not judged by the rule
    [older] = verdicts(feed(state, run.eval(30, **full), run.ckpt(30)))
    assert older.verdict == "approved" and "text_only_accuracy" not in older.metrics


def test_eval_regression_against_the_runs_best() -> None:
    state, run = engine(), Run()
    out = feed(state, run.eval(10, accuracy=0.7), run.eval(20, accuracy=0.8), run.eval(30, accuracy=0.76))
    assert flags(out) == []  # 0.04 below the best: within tolerance
    [flag] = flags(feed(state, run.eval(40, accuracy=0.74)))
    assert flag.rule == "eval_regression" and flag.threshold == pytest.approx(0.75)
    assert (
        flag.message
        == "accuracy fell to 0.74 at step 40, 0.06 below the run's best of 0.8 (at step 20; tolerance 0.05)"
    )


# ---- verdicts ----------------------------------------------------------------------------


def test_one_verdict_per_checkpoint_judged_on_latest_eval_at_or_before_its_step() -> None:
    state, run = engine(), Run()
    ev20 = run.eval(20, accuracy=0.6)
    ckpt = run.ckpt(30)
    out = feed(state, run.eval(10, accuracy=0.55), ev20, ckpt, ckpt, run.eval(40, accuracy=0.2))
    [verdict] = verdicts(out)
    assert verdict.event_id == f"r1.audit.verdict.{ckpt.event_id}"
    assert (verdict.verdict, verdict.checkpoint_step, verdict.eval_event_id) == ("approved", 30, ev20.event_id)
    assert verdict.metrics["accuracy"] == 0.6 and verdict.metrics["eval_step"] == 20


def test_failing_eval_rejects_with_the_rule_named_and_no_eval_judges_on_flags_only() -> None:
    state, run = engine(), Run()
    [first] = verdicts(feed(state, run.ckpt(5)))
    assert first.verdict == "approved" and first.eval_event_id is None and first.metrics == {}
    [verdict] = verdicts(feed(state, run.eval(10, accuracy=0.3), run.ckpt(10)))
    assert verdict.verdict == "rejected"
    assert verdict.reasons == ["accuracy_floor (warning): accuracy was 0.3 at step 10, below the minimum of 0.5"]


def test_checkpoint_after_blow_up_rejected_earlier_ones_stay_approved() -> None:
    state, run = engine(), Run()
    before = feed(state, *healthy(run, range(1, 11)), run.eval(10), run.ckpt(10))
    nan_step = run.step(12, loss=NAN)
    after = feed(state, run.step(11), nan_step, run.ckpt(12), run.step(13, loss=NAN), run.ckpt(14))
    assert [v.verdict for v in verdicts(before)] == ["approved"]
    rejected = verdicts(after)
    assert [(v.checkpoint_step, v.verdict) for v in rejected] == [(12, "rejected"), (14, "rejected")]
    assert rejected[0].reasons == [
        f"non_finite (critical): loss is NaN at step 12, not cleared by step 12 (flag r1.audit.non_finite.{nan_step.event_id})"
    ]
    recovered = feed(state, run.step(15, loss=1.0), run.ckpt(16))
    assert [v.verdict for v in verdicts(recovered)] == ["approved"]


def test_flag_only_rules_never_reject() -> None:
    state, run = engine(), Run()
    [verdict] = verdicts(feed(state, run.eval(10, ece=0.5), run.ckpt(10)))
    assert verdict.verdict == "approved"


def test_evaluate_missing_asks_for_an_eval_and_judges_on_the_next_one() -> None:
    state, run = engine(evaluate_missing=True), Run()
    out = feed(state, run.step(9), run.step(10, loss=NAN), run.ckpt(10), run.step(11), run.step(12))
    assert [o for o in out if isinstance(o, Send)] == [
        Send("evaluate", "r1", "audit: checkpoint at step 10 has no evaluation to judge")
    ]
    assert verdicts(out) == []
    ev = run.eval(12)
    [verdict] = verdicts(feed(state, ev))
    # judged on the eval that came after, and on the flag raised at its step (cleared later)
    assert verdict.eval_event_id == ev.event_id and verdict.verdict == "rejected"
    assert verdict.reasons[0].startswith("non_finite (critical): loss is NaN at step 10, not cleared by step")


def test_evaluate_missing_judges_pending_on_flags_when_the_run_finishes() -> None:
    state, run = engine(evaluate_missing=True), Run()
    feed(state, run.ckpt(10))
    [verdict] = verdicts(feed(state, run.stamper.emit(RunFinished, status="completed", step=10)))
    assert verdict.verdict == "approved" and verdict.eval_event_id is None


def test_approved_checkpoints_become_bucket_records_with_best_pointer() -> None:
    state, run = engine(), Run()
    out = feed(state, run.eval(10, accuracy=0.7), run.ckpt(10), run.eval(20, accuracy=0.68), run.ckpt(20))
    records = [o.records for o in out if isinstance(o, Publish)]
    assert [[key for key, _ in r] for r in records] == [["r1.10", "r1.best"], ["r1.20"]]
    best = records[0][1][1]
    assert best["key"] == "r1.10" and best["value"] == 0.7 and best["metric"] == "accuracy"
    assert records[0][0][1]["verdict_event_id"].startswith("r1.audit.verdict.")


def test_a_new_attempt_starts_with_a_clean_slate() -> None:
    state, first = engine(), Run(attempt=1)
    feed(state, *healthy(first, range(1, 5)), first.step(5, loss=NAN))
    second = Run(attempt=2)
    out = feed(state, second.started(), second.step(5), second.ckpt(6))
    [verdict] = verdicts(out)
    assert verdict.verdict == "approved" and verdict.attempt == 2


# ---- stall -------------------------------------------------------------------------------


def test_stall_flagged_by_tick_once_and_cleared_by_next_heartbeat() -> None:
    state, run = engine(), Run()
    beat = run.beat(7, T0)
    assert flags(feed(state, beat, Tick(T0 + timedelta(seconds=29)))) == []
    [flag] = flags(feed(state, Tick(T0 + timedelta(seconds=31)), Tick(T0 + timedelta(seconds=40))))
    assert flag.rule == "run_stalled" and flag.step == 7 and flag.event_id == f"r1.audit.run_stalled.{beat.event_id}"
    assert "the last one was at step 7, while training" in flag.message
    # a heartbeat clears it; the gap it closes is the stall already flagged, not a new one
    assert flags(feed(state, run.beat(8, T0 + timedelta(seconds=45)))) == []
    assert flags(feed(state, Tick(T0 + timedelta(seconds=60)))) == []


def test_stall_found_in_history_without_ticks_has_the_same_id() -> None:
    state, run = engine(), Run()
    beat = run.beat(7, T0)
    [flag] = flags(feed(state, beat, run.beat(8, T0 + timedelta(seconds=45))))
    assert flag.event_id == f"r1.audit.run_stalled.{beat.event_id}"


def test_no_stall_for_finished_runs() -> None:
    state, run = engine(), Run()
    done = run.stamper.emit(RunFinished, status="completed", step=7)
    assert flags(feed(state, run.beat(7, T0), done, Tick(T0 + timedelta(minutes=5)))) == []


def test_same_events_same_outputs() -> None:
    run = Run()
    events = [*healthy(run, range(1, 6)), run.step(6, loss=NAN), run.ckpt(6), run.eval(8, accuracy=0.1), run.ckpt(8)]
    ids = [[o.event.event_id for o in feed(engine(), *events) if isinstance(o, Publish)] for _ in range(2)]
    assert ids[0] == ids[1] and len(ids[0]) == 4
