"""The dashboard's per-run state: what a user sees for a run, folded from its events, in bounded memory."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboards.app.series import DISPLAY_POINTS, RAW_CAP, Series, for_display
from dashboards.app.snapshot import snapshot_run, summarise
from dashboards.app.state import DashboardState, count_invalid, count_newer, forget, handle
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Heartbeat,
    RunFinished,
    RunNote,
    RunStarted,
    RunState,
    RunTag,
    TrainStep,
)
from schemas.common import SCHEMA_VERSION
from schemas.predict import PredictorLoaded

SHA = "0" * 64


class Run:
    """Builds the events of one run with consecutive seqs (trainer or audit source)."""

    def __init__(self, run_id: str = "r1", attempt: int = 1) -> None:
        self.run_id, self.attempt, self.seq, self.audit_seq = run_id, attempt, 0, 0

    def __call__(self, cls: type[Any], **fields: Any) -> Any:
        self.seq += 1
        return cls(
            event_id=f"{self.run_id}.{self.attempt}.{self.seq}",
            run_id=self.run_id,
            attempt=self.attempt,
            seq=self.seq,
            schema_version=SCHEMA_VERSION,
            **fields,
        )

    def audit(self, cls: type[Any], **fields: Any) -> Any:
        self.audit_seq += 1
        return cls(
            event_id=f"{self.run_id}.audit.1.{self.audit_seq}",
            run_id=self.run_id,
            seq=self.audit_seq,
            source="audit",
            **fields,
        )

    def started(self, max_steps: int = 100, **fields: Any) -> RunStarted:
        fields.setdefault("hyperparameters", {"learning_rate": 1e-3, "max_grad_norm": 1.0})
        return self(
            RunStarted, config={"training": {"max_steps": max_steps}}, config_hash="h", model="tiny", adapter="lora",
            data_fingerprint="d", max_steps=max_steps, **fields,
        )  # fmt: skip

    def step(self, step: int, loss: float = 1.0) -> TrainStep:
        return self(TrainStep, step=step, epoch=step / 100, loss=loss, learning_rate=1e-3, grad_norm=0.5)


def fold(*events: Any) -> DashboardState:
    state = DashboardState()
    for event in events:
        handle(event, state)
    return state


def test_a_run_shows_its_state_step_loss_accuracy_and_verdicts() -> None:
    r = Run()
    ckpt = r(Checkpoint, step=20, path="/c20", sha256=SHA, size_bytes=10)
    ckpt2 = r(Checkpoint, step=40, path="/c40", sha256=SHA, size_bytes=10)
    state = fold(
        r.started(),
        r.step(10, 2.0),
        r(Evaluation, step=20, loss=1.0, accuracy=0.8),
        r.step(20, 1.5),
        ckpt,
        r(Evaluation, step=40, loss=0.9, accuracy=0.6),
        ckpt2,
        r.audit(
            AuditVerdict,
            checkpoint_event_id=ckpt.event_id,
            checkpoint_step=20,
            checkpoint_path="/c20",
            verdict="approved",
        ),
        r.audit(
            AuditVerdict,
            checkpoint_event_id=ckpt2.event_id,
            checkpoint_step=40,
            checkpoint_path="/c40",
            verdict="rejected",
            reasons=["eval_regression"],
        ),
        r(RunState, state="paused", step=40),
    )
    summary = summarise(state.runs["r1"])
    assert (summary.state, summary.step, summary.max_steps, summary.loss) == ("paused", 40, 100, 1.5)
    assert summary.best_accuracy == 0.8
    assert (summary.approved, summary.rejected, summary.pending) == (1, 1, 0)
    snap = snapshot_run(state.runs["r1"])
    assert [(c.step, c.verdict, c.reasons) for c in snap.checkpoints] == [
        (20, "approved", ()),
        (40, "rejected", ("eval_regression",)),
    ]


def test_a_verdict_before_its_checkpoint_still_judges_it() -> None:
    r = Run()
    ckpt = r(Checkpoint, step=5, path="/c", sha256=SHA, size_bytes=1)
    verdict = r.audit(
        AuditVerdict, checkpoint_event_id=ckpt.event_id, checkpoint_step=5, checkpoint_path="/c", verdict="approved"
    )
    state = fold(r.started(), verdict, ckpt)
    assert snapshot_run(state.runs["r1"]).checkpoints[0].verdict == "approved"


def test_finished_is_final_and_a_resumed_attempt_replaces_the_tail() -> None:
    r = Run()
    events: list[Any] = [r.started(), *[r.step(s) for s in range(1, 51)]]
    events.append(r(RunFinished, status="failed", step=50, error="CUDA out of memory"))
    events.append(r(RunState, state="running", step=50))  # a straggler cannot undo "failed"
    state = fold(*events)
    assert state.runs["r1"].life.state == "failed" and state.runs["r1"].life.reason == "CUDA out of memory"
    again = Run(attempt=2)
    handle(again.started(resumed_from_step=30), state)
    handle(again.step(31, 0.5), state)
    snap = snapshot_run(state.runs["r1"])
    steps, _losses = snap.series["loss"]
    assert steps[-1] == 31 and list(steps[-3:]) == [29.0, 30.0, 31.0]
    assert snap.summary.state == "running" and snap.summary.attempt == 2
    assert ("resume", 30.0) in [(m.kind, m.step) for m in snap.markers]
    handle(r.step(49), state)  # attempt 1 is gone: its late events are ignored
    assert snapshot_run(state.runs["r1"]).series["loss"][0][-1] == 31


def test_commands_are_one_row_each_and_set_updates_live_hyperparameters() -> None:
    r = Run()
    state = fold(
        r.started(),
        r(CommandResult, command_id="c1", command="set", status="accepted", issued_by="alice", step=3),
        r(
            CommandResult,
            command_id="c1",
            command="set",
            status="applied",
            issued_by="alice",
            step=4,
            applied={"learning_rate": 5e-4, "current_learning_rate": 4e-4},
        ),
        r(
            CommandResult,
            command_id="c2",
            command="pause",
            status="rejected",
            code="not_applicable",
            message="paused",
            issued_by="bob",
        ),
    )
    snap = snapshot_run(state.runs["r1"])
    rows = {c.command_id: c for c in snap.commands}
    assert (rows["c1"].status, rows["c1"].accepted_step, rows["c1"].applied_step) == ("applied", 3, 4)
    assert (rows["c2"].status, rows["c2"].code, rows["c2"].issued_by) == ("rejected", "not_applicable", "bob")
    assert snap.hyperparameters["learning_rate"] == 5e-4
    assert [(m.kind, m.step, m.label) for m in snap.markers] == [("command", 4.0, "set learning_rate=0.0005")]


def test_flags_are_kept_with_markers_and_heartbeats_move_the_step() -> None:
    r = Run()
    state = fold(
        r.started(),
        r.audit(AuditFlag, rule="loss_spike", severity="critical", step=7, message="spike", judged_event_id="x"),
        r(Heartbeat, step=9, phase="training"),
    )
    snap = snapshot_run(state.runs["r1"])
    assert [(f.rule, f.severity, f.step) for f in snap.flags] == [("loss_spike", "critical", 7)]
    assert snap.summary.step == 9 and ("flag", 7.0) in [(m.kind, m.step) for m in snap.markers]


def test_redelivered_stream_sequences_count_once_and_invalid_events_are_counted() -> None:
    r = Run()
    state = DashboardState()
    handle(r.started(), state, stream_seq=1)
    step = r.step(1)
    handle(step, state, stream_seq=2)
    handle(step, state, stream_seq=2)
    count_invalid(state, "trainbus.events.r1.train.step", "loss: not a number", stream_seq=3)
    count_invalid(state, "trainbus.events.r1.train.step", "loss: not a number", stream_seq=3)
    assert state.runs["r1"].events == 2 and state.events == 2
    assert state.invalid_events == 1 and "loss: not a number" in state.invalid_recent[-1]


def test_events_of_a_newer_schema_are_counted_apart_and_reported_once_per_run() -> None:
    state = DashboardState()
    assert count_newer(state, "r1", stream_seq=1) is True
    assert count_newer(state, "r1", stream_seq=2) is False
    assert count_newer(state, "r1", stream_seq=2) is False  # a redelivery
    assert count_newer(state, "r2", stream_seq=3) is True
    assert state.newer_events == 3 and state.invalid_events == 0 and not state.runs


def test_a_nan_loss_is_the_latest_loss_but_no_point_on_the_line() -> None:
    r = Run()
    state = fold(r.started(), r.step(1, 1.0), r.step(2, math.nan))
    snap = snapshot_run(state.runs["r1"])
    assert math.isnan(snap.summary.loss or 0.0)
    assert list(snap.series["loss"][1]) == [1.0] and snap.non_finite["loss"] == (2.0,)


def test_a_100k_step_run_stays_bounded_and_keeps_its_spike() -> None:
    r = Run()
    state = fold(r.started(max_steps=100_000))
    run = state.runs["r1"]
    for step in range(1, 100_001):
        handle(r.step(step, 50.0 if step == 54_321 else 1.0 + 1.0 / step), state)
    steps, losses = snapshot_run(run).series["loss"]
    assert len(steps) <= RAW_CAP and np.all(np.diff(steps) > 0)
    assert 54_321.0 in steps and losses.max() == 50.0
    shown_steps, shown = snapshot_run(run).display["loss"]
    assert len(shown_steps) <= DISPLAY_POINTS and shown.max() == 50.0 and shown_steps[-1] == 100_000


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=3000))
def test_stored_points_never_lose_the_largest_or_smallest_value(values: list[float]) -> None:
    series = Series(cap=64)
    for i, value in enumerate(values):
        series.append(float(i), value)
    x, y = series.arrays()
    assert len(x) <= 64 and np.all(np.diff(x) > 0)
    assert y.max() == max(values) and y.min() == min(values)


@settings(max_examples=50, deadline=None)
@given(st.integers(200, 20_000), st.data())
def test_a_chart_keeps_a_loss_spike(n: int, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, n - 1))
    x = np.arange(n, dtype=np.float64)
    y = 2.0 * np.exp(-x / n) + 0.01 * np.sin(x)  # a noisy decreasing loss
    y[at] = 25.0
    sx, sy = for_display(x, y, 100)
    assert len(sx) <= 100 and sy.max() == 25.0 and sx[0] == 0 and sx[-1] == n - 1


def test_tags_are_set_and_removed_and_a_note_marks_the_step_the_run_had_reached() -> None:
    r = Run()
    user = dict(source="user", issued_by="alice")
    state = fold(
        r.started(),
        r.step(1),
        r(RunTag, tags={"team": "risk", "dataset": "v1"}, **user),
        r.step(2),
        r(RunNote, text="lr 3e-3 diverged;\nretrying with 1e-3", **user),
        r(RunTag, tags={"dataset": "v2", "team": ""}, **user),
    )
    run = state.runs["r1"]
    assert run.tags == {"dataset": "v2"}
    assert summarise(run).tags == {"dataset": "v2"}
    note = snapshot_run(run).notes[-1]
    assert (note.step, note.issued_by, note.text) == (2, "alice", "lr 3e-3 diverged;\nretrying with 1e-3")
    assert [(m.kind, m.step, m.label) for m in run.markers] == [("note", 2.0, "lr 3e-3 diverged; retrying with 1e-3")]


def test_predictor_loads_keep_the_newest_per_alias_and_replica() -> None:
    r = Run()

    def loaded(instance: str, step: int, **fields: Any) -> PredictorLoaded:
        return r(
            PredictorLoaded, source="predictor", alias=fields.pop("alias", "risk"), subject="trainbus.predict.risk",
            step=step, checkpoint_path=f"/c{step}", sha256=SHA, verdict="approved", instance=instance, **fields,
        )  # fmt: skip

    state = fold(
        r.started(),
        loaded("A", 20),
        loaded("B", 20),
        loaded("A", 40, trigger="hot_swap", previous_step=20),
        loaded("C", 40, alias="canary"),
    )
    snap = snapshot_run(state.runs["r1"])
    assert [(s.alias, s.instance, s.step) for s in snap.serving] == [
        ("risk", "B", 20),
        ("risk", "A", 40),
        ("canary", "C", 40),
    ]
    assert [s.step for s in snap.loads] == [20, 20, 40, 40]
    assert state.runs["r1"].life.state == "running"  # a predictor's event says nothing about training


def test_chat_evaluations_report_perplexity_and_no_classification_metrics() -> None:
    r = Run()
    state = fold(
        r.started(),
        r(Evaluation, step=10, loss=2.0, perplexity=7.39),
        r(Evaluation, step=20, loss=1.0, perplexity=2.72),
    )
    run = summarise(state.runs["r1"])
    assert (run.best_accuracy, run.best_perplexity) == (None, 2.72)
    point = state.runs["r1"].evals[-1]
    assert point.metrics["perplexity"] == 2.72 and point.metrics["accuracy"] is None and point.labels == ()


def test_a_purged_run_is_forgotten_and_only_events_after_the_purge_bring_it_back() -> None:
    r, other = Run("r1"), Run("r2")
    state = DashboardState()
    for seq, event in enumerate([r.started(), r.step(1), other.started()], start=1):
        handle(event, state, stream_seq=seq)
    state.best["r1"] = "verdict-1"
    forget(state, "r1", purged_at=3)
    assert set(state.runs) == {"r2"} and "r1" not in state.best and state.removed == {"r1": 3}
    handle(r.step(2), state, stream_seq=3)  # delivered before the purge, folded after: stays gone
    assert "r1" not in state.runs
    handle(r.started(), state, stream_seq=4)  # published again after the purge
    assert state.runs["r1"].first_seq == 4 and state.runs["r1"].step == 0
