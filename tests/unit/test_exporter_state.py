"""The exporter's pure state and its collector, without a broker: what a scrape of /metrics shows."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import generate_latest

from consumers.exporter.collector import RunCollector, build_registry
from consumers.exporter.state import MAX_AHEAD, MAX_OTHER_IDS, ExporterState, count_invalid, expire, handle
from runtime.publish.sinks import MemorySink, Stamper
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    Heartbeat,
    RunFinished,
    RunStarted,
    RunState,
    TrainStep,
)

HP = {"learning_rate": 1e-3}
SHA = "a" * 64
NOW = 1_800_000_000.0


class Scrape:
    """A fresh registry over ``state``; ``value(name, **labels)`` reads one sample."""

    def __init__(
        self,
        state: ExporterState,
        *,
        now: float | None = None,
        expire_after: float = 3600.0,
        audit_rules: list[tuple[str, str]] | None = None,
    ) -> None:
        clock = time.time if now is None else (lambda: now)
        self.collector = RunCollector(
            state, threading.Lock(), expire_after=expire_after, audit_rules=audit_rules or [], clock=clock
        )
        self.registry = build_registry(self.collector)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def feed(state: ExporterState, *events: Event) -> ExporterState:
    for event in events:
        handle(event, state)
    return state


def started(stamper: Stamper, **extra: Any) -> Event:
    return stamper.emit(
        RunStarted,
        config={},
        config_hash="h",
        model="tiny",
        adapter="lora",
        data_fingerprint="d",
        hyperparameters=HP,
        **extra,
    )


def test_train_step_sets_the_training_gauges() -> None:
    trainer = Stamper(MemorySink(), "r1")
    state = feed(
        ExporterState(),
        started(trainer),
        trainer.emit(
            TrainStep,
            step=10,
            epoch=0.5,
            loss=0.75,
            learning_rate=2e-3,
            grad_norm=1.5,
            tokens_per_second=900.0,
            samples_per_second=12.0,
            step_time_seconds=0.25,
            memory_bytes=1 << 20,
        ),
    )
    m = Scrape(state)
    assert m.value("trainbus_train_loss", run_id="r1") == 0.75
    assert m.value("trainbus_learning_rate", run_id="r1") == 2e-3
    assert m.value("trainbus_grad_norm", run_id="r1") == 1.5
    assert m.value("trainbus_global_step", run_id="r1") == 10
    assert m.value("trainbus_epoch", run_id="r1") == 0.5
    assert m.value("trainbus_train_tokens_per_second", run_id="r1") == 900.0
    assert m.value("trainbus_train_samples_per_second", run_id="r1") == 12.0
    assert m.value("trainbus_train_step_duration_seconds", run_id="r1") == 0.25
    assert m.value("trainbus_memory_bytes", run_id="r1") == 1 << 20
    assert m.value("trainbus_run_state", run_id="r1", state="running") == 1
    assert m.value("trainbus_run_info", run_id="r1", model="tiny", adapter="lora") == 1
    assert m.value("trainbus_events_total", run_id="r1", type="train.step") == 1


def test_eval_sets_every_eval_gauge() -> None:
    trainer = Stamper(MemorySink(), "r1")
    state = feed(
        ExporterState(),
        trainer.emit(
            Evaluation,
            step=20,
            loss=0.4,
            accuracy=0.9,
            macro_f1=0.85,
            abstain_rate=0.05,
            ece=0.03,
            critical_error_cost=2.0,
            text_only_accuracy=0.88,
            text_only_abstain_rate=0.07,
        ),
    )
    m = Scrape(state)
    expected = {
        "trainbus_eval_text_only_accuracy_ratio": 0.88,
        "trainbus_eval_text_only_abstention_ratio": 0.07,
        "trainbus_eval_loss": 0.4,
        "trainbus_eval_accuracy_ratio": 0.9,
        "trainbus_eval_macro_f1": 0.85,
        "trainbus_eval_abstention_ratio": 0.05,
        "trainbus_eval_calibration_error": 0.03,
        "trainbus_eval_critical_error_cost": 2.0,
        "trainbus_eval_step": 20,
        "trainbus_global_step": None,  # an eval is not a training step report
    }
    assert {name: m.value(name, run_id="r1") for name in expected} == expected


def test_an_eval_without_the_text_only_figures_leaves_their_gauges_out() -> None:
    state = feed(ExporterState(), Stamper(MemorySink(), "r1").emit(Evaluation, step=20, loss=0.4, accuracy=0.9))
    m = Scrape(state)
    assert m.value("trainbus_eval_accuracy_ratio", run_id="r1") == 0.9
    assert m.value("trainbus_eval_text_only_accuracy_ratio", run_id="r1") is None  # an older trainer: not a 0


def test_checkpoints_are_pending_until_a_verdict_arrives() -> None:
    trainer, audit = Stamper(MemorySink(), "r1"), Stamper(MemorySink(), "r1", source="audit")
    first = trainer.emit(Checkpoint, step=20, path="/c/20", sha256=SHA, size_bytes=4096)
    second = trainer.emit(Checkpoint, step=40, path="/c/40", sha256=SHA, size_bytes=8192)
    state = feed(ExporterState(), first, second)
    m = Scrape(state)
    assert [m.value("trainbus_checkpoints", run_id="r1", verdict=v) for v in ("pending", "approved", "rejected")] == [
        2,
        0,
        0,
    ]
    assert m.value("trainbus_checkpoint_size_bytes", run_id="r1") == 8192
    verdict = dict(checkpoint_step=20, checkpoint_path="/c/20")
    feed(state, audit.emit(AuditVerdict, checkpoint_event_id=first.event_id, verdict="approved", **verdict))
    feed(state, audit.emit(AuditVerdict, checkpoint_event_id=second.event_id, verdict="rejected", **verdict))
    assert [m.value("trainbus_checkpoints", run_id="r1", verdict=v) for v in ("pending", "approved", "rejected")] == [
        0,
        1,
        1,
    ]


def test_audit_flags_and_command_results_are_counted_by_their_labels() -> None:
    audit, trainer = Stamper(MemorySink(), "r1", source="audit"), Stamper(MemorySink(), "r1")
    flag = dict(message="loss is NaN", judged_event_id="r1.1.3")
    state = feed(
        ExporterState(),
        audit.emit(AuditFlag, rule="nan_loss", severity="critical", **flag),
        audit.emit(AuditFlag, rule="nan_loss", severity="critical", **flag),
        audit.emit(AuditFlag, rule="loss_spike", severity="warning", **flag),
        trainer.emit(CommandResult, command_id="c1", command="pause", status="accepted"),
        trainer.emit(CommandResult, command_id="c1", command="pause", status="applied", step=5),
        trainer.emit(CommandResult, command_id="c2", command="set", status="rejected", code="out_of_range"),
    )
    m = Scrape(state)
    assert m.value("trainbus_audit_flags_total", run_id="r1", rule="nan_loss", severity="critical") == 2
    assert m.value("trainbus_audit_flags_total", run_id="r1", rule="loss_spike", severity="warning") == 1
    assert m.value("trainbus_commands_total", run_id="r1", command="pause", result="accepted") == 1
    assert m.value("trainbus_commands_total", run_id="r1", command="pause", result="applied") == 1
    assert m.value("trainbus_commands_total", run_id="r1", command="set", result="rejected") == 1


def test_run_state_follows_the_lifecycle_and_exactly_one_state_is_set() -> None:
    trainer = Stamper(MemorySink(), "r1")
    state = feed(ExporterState(), started(trainer))
    m = Scrape(state)

    def current() -> list[str]:
        text = [line for line in m.text().splitlines() if line.startswith("trainbus_run_state{")]
        return [line.split('state="')[1].split('"')[0] for line in text if line.endswith(" 1.0")]

    assert current() == ["running"]
    feed(state, trainer.emit(RunState, state="paused", step=7, reason="operator"))
    assert current() == ["paused"]
    assert m.value("trainbus_global_step", run_id="r1") == 7
    feed(state, trainer.emit(Heartbeat, step=7, phase="paused"))
    assert current() == ["paused"]
    feed(state, trainer.emit(RunFinished, status="failed", step=7, error="boom"))
    assert current() == ["failed"]
    # a late run.state (e.g. from a racing thread) does not undo the finish
    feed(state, trainer.emit(RunState, state="running", step=7))
    assert current() == ["failed"]


def test_last_event_timestamp_is_the_newest_event_time() -> None:
    trainer = Stamper(MemorySink(), "r1")
    t0 = datetime(2027, 1, 1, tzinfo=UTC)
    late = trainer.emit(Heartbeat, step=1, phase="training", time=t0 + timedelta(seconds=30))
    early = trainer.emit(Heartbeat, step=1, phase="training", time=t0)
    m = Scrape(feed(ExporterState(), late, early))
    assert m.value("trainbus_last_event_timestamp_seconds", run_id="r1") == t0.timestamp() + 30


def test_the_same_event_twice_counts_once() -> None:
    audit = Stamper(MemorySink(), "r1", source="audit")
    flag = audit.emit(AuditFlag, rule="nan_loss", severity="critical", message="m", judged_event_id="x")
    state = feed(ExporterState(), flag, flag, flag)
    m = Scrape(state)
    assert m.value("trainbus_audit_flags_total", run_id="r1", rule="nan_loss", severity="critical") == 1
    assert m.value("trainbus_events_total", run_id="r1", type="audit.flag") == 1
    assert m.value("trainbus_exporter_duplicate_events_total") == 2


def test_nan_and_infinite_values_are_rendered_as_prometheus_nan_and_inf() -> None:
    trainer = Stamper(MemorySink(), "r1")
    state = feed(
        ExporterState(),
        trainer.emit(TrainStep, step=3, epoch=0.1, loss=float("nan"), learning_rate=1e-3, grad_norm=float("inf")),
    )
    text = Scrape(state).text()
    assert 'trainbus_train_loss{run_id="r1"} NaN' in text
    assert 'trainbus_grad_norm{run_id="r1"} +Inf' in text


def test_invalid_events_are_counted() -> None:
    state = count_invalid(count_invalid(ExporterState()))
    assert Scrape(state).value("trainbus_exporter_invalid_events_total") == 2


def test_runs_without_events_expire_finished_or_not_and_runs_that_beat_never_do() -> None:
    t0 = datetime.fromtimestamp(NOW, UTC)
    done, dead, live = Stamper(MemorySink(), "done"), Stamper(MemorySink(), "dead"), Stamper(MemorySink(), "live")
    state = feed(
        ExporterState(),
        started(done, time=t0),
        done.emit(RunFinished, status="completed", step=60, time=t0),
        started(dead, time=t0),  # killed with kill -9: no run.finished, ever
        started(live, time=t0),
    )
    assert Scrape(state, now=NOW + 59, expire_after=60).value("trainbus_run_state", run_id="done", state="completed")
    feed(state, live.emit(Heartbeat, step=1, phase="training", time=t0 + timedelta(seconds=50)))
    m = Scrape(state, now=NOW + 61, expire_after=60)
    assert m.value("trainbus_run_state", run_id="done", state="completed") is None
    assert m.value("trainbus_run_state", run_id="dead", state="stalled") is None
    assert "done" not in m.text() and "dead" not in m.text()
    assert m.value("trainbus_run_state", run_id="live", state="running") == 1
    assert m.value("trainbus_exporter_expired_runs_total") == 2
    assert m.value("trainbus_exporter_runs") == 1
    # a week later, beating all along, the live run is still there
    feed(state, live.emit(Heartbeat, step=1, phase="paused", time=t0 + timedelta(days=7)))
    assert expire(state, NOW + 86400 * 7 + 5, 60) == []


def test_a_live_run_whose_trainer_went_silent_is_stalled_until_a_resumed_attempt_replaces_it() -> None:
    t0 = datetime.fromtimestamp(NOW, UTC)
    trainer, audit = Stamper(MemorySink(), "r1"), Stamper(MemorySink(), "r1", source="audit")
    state = feed(ExporterState(), started(trainer, time=t0), trainer.emit(Heartbeat, step=3, phase="training", time=t0))
    assert Scrape(state, now=NOW + 29).value("trainbus_run_state", run_id="r1", state="running") == 1
    # the audit gate's flag about the silence is no sign of life
    feed(state, audit.emit(AuditFlag, rule="run_stalled", severity="warning", message="m", judged_event_id="x",
                           time=t0 + timedelta(seconds=31)))  # fmt: skip
    m = Scrape(state, now=NOW + 31)
    assert m.value("trainbus_run_state", run_id="r1", state="stalled") == 1
    assert m.value("trainbus_run_state", run_id="r1", state="running") == 0
    assert Scrape(state, now=NOW + 31, expire_after=3600).value("trainbus_run_state", run_id="r1", state="stalled") == 1
    resumed = Stamper(MemorySink(), "r1", attempt=2)
    feed(state, started(resumed, resumed_from_step=3, time=t0 + timedelta(seconds=40)))
    m = Scrape(state, now=NOW + 41)
    assert m.value("trainbus_run_state", run_id="r1", state="running") == 1
    assert m.value("trainbus_run_state", run_id="r1", state="stalled") == 0
    assert m.value("trainbus_run_attempt", run_id="r1") == 2
    # a finished run is silent by design: never stalled
    feed(state, resumed.emit(RunFinished, status="completed", step=9, time=t0 + timedelta(seconds=42)))
    assert Scrape(state, now=NOW + 600).value("trainbus_run_state", run_id="r1", state="completed") == 1


def test_label_values_known_in_advance_exist_at_zero_from_the_first_event() -> None:
    trainer = Stamper(MemorySink(), "r1")
    state = feed(ExporterState(), started(trainer))
    rules = [("loss_spike", "critical"), ("calibration", "warning")]
    m = Scrape(state, audit_rules=rules)
    commands = {"pause", "resume", "stop", "save_checkpoint", "evaluate", "set"}
    for command in commands:
        for result in ("accepted", "applied", "rejected"):
            assert m.value("trainbus_commands_total", run_id="r1", command=command, result=result) == 0
    for rule, severity in rules:
        assert m.value("trainbus_audit_flags_total", run_id="r1", rule=rule, severity=severity) == 0
    for verdict in ("pending", "approved", "rejected"):
        assert m.value("trainbus_checkpoints", run_id="r1", verdict=verdict) == 0
    for name in ("unknown", "running", "paused", "stopping", "stalled", "completed", "stopped", "failed"):
        assert m.value("trainbus_run_state", run_id="r1", state=name) == (1 if name == "running" else 0)
    assert m.value("trainbus_events_total", run_id="r1", type="heartbeat") == 0
    assert m.value("trainbus_events_total", run_id="r1", type="run.started") == 1
    # a counted value replaces its zero; a pair outside the rules file still shows
    audit = Stamper(MemorySink(), "r1", source="audit")
    feed(state, audit.emit(AuditFlag, rule="loss_spike", severity="critical", message="m", judged_event_id="x"))
    feed(state, audit.emit(AuditFlag, rule="custom", severity="info", message="m", judged_event_id="y"))
    feed(state, trainer.emit(CommandResult, command_id="c1", command="set", status="rejected", code="invalid"))
    assert m.value("trainbus_audit_flags_total", run_id="r1", rule="loss_spike", severity="critical") == 1
    assert m.value("trainbus_audit_flags_total", run_id="r1", rule="custom", severity="info") == 1
    assert m.value("trainbus_commands_total", run_id="r1", command="set", result="rejected") == 1
    assert m.value("trainbus_commands_total", run_id="r1", command="set", result="accepted") == 0


def test_id_memory_of_a_long_run_stays_bounded_and_still_recognises_every_repeat() -> None:
    trainer = Stamper(MemorySink(), "r1")
    steps = [trainer.emit(Heartbeat, step=i, phase="training") for i in range(50_000)]
    state = feed(ExporterState(), *steps)
    run = state.runs["r1"]
    assert run.events["heartbeat"] == 50_000
    assert len(run.seen) <= 2  # one watermark, not 50,000 ids
    feed(state, steps[0], steps[25_000], steps[-1])
    assert state.duplicate_events == 3 and run.events["heartbeat"] == 50_000


def test_out_of_order_and_lost_events_keep_counting_exactly_in_bounded_memory() -> None:
    trainer = Stamper(MemorySink(), "r1")
    events = [trainer.emit(Heartbeat, step=i, phase="training") for i in range(MAX_AHEAD + 100)]
    state = feed(ExporterState(), events[2], events[1], events[0], events[2])  # out of order, then a repeat
    run = state.runs["r1"]
    assert run.events["heartbeat"] == 3 and state.duplicate_events == 1 and len(run.seen) == 1
    # event 4 never arrives (aged out of the stream): what comes after is counted all the same
    feed(state, *events[4:])
    assert run.events["heartbeat"] == 3 + len(events) - 4
    assert len(run.seen) <= MAX_AHEAD + 1
    # the audit gate's ids are not <prefix>.<seq>: kept one by one, the newest MAX_OTHER_IDS of them
    flags = [
        AuditFlag(event_id=f"r1.audit.r.r1.1.{i}", run_id="r1", seq=i, source="audit", rule="r", severity="info",
                  message="m", judged_event_id=f"r1.1.{i}")
        for i in range(1, MAX_OTHER_IDS + 11)
    ]  # fmt: skip
    feed(state, flags[0], flags[0], *flags[1:], flags[-1])
    assert run.events["audit.flag"] == len(flags) and state.duplicate_events == 3
    assert len(run.seen.others) == MAX_OTHER_IDS


def test_a_silent_run_that_expired_comes_back_with_its_trainer_a_finished_one_only_with_a_resume() -> None:
    t0 = datetime.fromtimestamp(NOW, UTC)
    cut_off, done = Stamper(MemorySink(), "cut-off"), Stamper(MemorySink(), "done")
    state = feed(
        ExporterState(),
        started(cut_off, time=t0),
        started(done, time=t0),
        done.emit(RunFinished, status="completed", step=1, time=t0),
    )
    assert sorted(expire(state, NOW + 120, 60)) == ["cut-off", "done"]
    late = t0 + timedelta(seconds=200)
    feed(state, cut_off.emit(Heartbeat, step=5, phase="training", time=late))
    feed(state, done.emit(Heartbeat, step=1, phase="stopping", time=late))
    assert "cut-off" in state.runs and "done" not in state.runs


def test_a_straggler_does_not_resurrect_an_expired_run_but_a_resume_does() -> None:
    trainer, audit = Stamper(MemorySink(), "r1"), Stamper(MemorySink(), "r1", source="audit")
    state = feed(ExporterState(), started(trainer), trainer.emit(RunFinished, status="completed", step=5))
    assert expire(state, time.time() + 61, 60) == ["r1"]
    feed(state, audit.emit(AuditFlag, rule="late", severity="info", message="m", judged_event_id="x"))
    assert "r1" not in state.runs and state.ignored_events == 1
    resumed = Stamper(MemorySink(), "r1", attempt=2)
    feed(state, started(resumed, resumed_from_step=5))
    m = Scrape(state)
    assert m.value("trainbus_run_state", run_id="r1", state="running") == 1
    assert m.value("trainbus_run_attempt", run_id="r1") == 2
    assert m.value("trainbus_global_step", run_id="r1") == 5


def test_lag_histogram_is_cumulative_and_counts_every_observation() -> None:
    state = ExporterState()
    for seconds in (0.001, 0.02, 0.02, 3.0, 1000.0, -0.5):
        state.lag.observe(seconds)
    m = Scrape(state)
    assert m.value("trainbus_exporter_event_lag_seconds_bucket", le="0.005") == 2  # negative skew counts as 0
    assert m.value("trainbus_exporter_event_lag_seconds_bucket", le="0.025") == 4
    assert m.value("trainbus_exporter_event_lag_seconds_bucket", le="5.0") == 5
    assert m.value("trainbus_exporter_event_lag_seconds_bucket", le="+Inf") == 6
    assert m.value("trainbus_exporter_event_lag_seconds_count") == 6
