"""Charts and tables of the dashboard are pure functions of snapshots: what each one shows."""

from __future__ import annotations

import re

from dashboards.app.charts import (
    EVAL_CHARTS,
    compare_eval_chart,
    compare_train_chart,
    confusion_chart,
    eval_chart,
    probability_chart,
    reported,
    train_chart,
)
from dashboards.app.control_panel import closed_because
from dashboards.app.snapshot import snapshot_run, summarise
from dashboards.app.state import DashboardState
from dashboards.app.tables import (
    RUN_LINK_TEXT,
    age,
    checkpoints_table,
    commands_table,
    config_diff,
    eval_table,
    filter_runs,
    flags_table,
    loads_table,
    notes_table,
    run_link,
    runs_table,
    serving_table,
    state_of,
)
from dashboards.app.tiles import MOST_CHARS, compact, run_tiles
from runtime.lifecycle import STALL_AFTER_SECONDS
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    RunFinished,
    RunNote,
    RunStarted,
    RunTag,
    TrainStep,
)
from schemas.predict import PredictorLoaded
from tests.unit.test_dashboard_state import SHA, Run, fold

LABELS = ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK"]


def _state(run_id: str = "r1", lr: float = 1e-3, steps: int = 30) -> DashboardState:
    r = Run(run_id)
    events = [
        r(
            RunStarted,
            config={"training": {"learning_rate": lr, "seed": 1}, "adapter": {"r": 8}},
            config_hash="h",
            model="tiny",
            adapter="lora",
            data_fingerprint="d",
            hyperparameters={"learning_rate": lr},
            max_steps=100,
        ),
        *[r.step(s, 2.0 / s) for s in range(1, steps + 1)],
        r(
            Evaluation,
            step=10,
            loss=0.5,
            accuracy=0.75,
            macro_f1=0.7,
            labels=LABELS,
            per_label_f1={"HIGH_RISK": 1.0, "NO_RISK": 0.5},
            confusion_matrix=[[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 4]],
        ),
        r(Evaluation, step=20, loss=0.4, accuracy=0.8),
    ]
    ckpt = r(Checkpoint, step=20, path="/runs/c20", sha256=SHA, size_bytes=1 << 20, metrics={"accuracy": 0.8})
    events += [
        ckpt,
        r.audit(
            AuditVerdict,
            checkpoint_event_id=ckpt.event_id,
            checkpoint_step=20,
            checkpoint_path="/runs/c20",
            verdict="rejected",
            reasons=["critical_error_cost 0.7 > 0.5"],
            metrics={"accuracy": 0.8},
        ),
        r.audit(
            AuditFlag,
            rule="grad_norm_explosion",
            severity="warning",
            step=12,
            message="grad norm 300",
            judged_event_id="x",
        ),
        r(CommandResult, command_id="c1", command="pause", status="accepted", issued_by="alice", step=15),
        r(CommandResult, command_id="c1", command="pause", status="applied", issued_by="alice", step=16),
    ]
    return fold(*events)


def test_train_chart_has_one_point_per_step_and_marks_commands_and_flags() -> None:
    snap = snapshot_run(_state().runs["r1"])
    chart = train_chart(snap, "loss")
    assert chart.points == 30 and list(chart.data["step"][:3]) == [1.0, 2.0, 3.0]
    rules = chart.spec["layer"][1]["data"]["values"]
    assert {(m["kind"], m["step"]) for m in rules} == {("flag", 12.0), ("command", 16.0)}
    memory = train_chart(snap, "memory_bytes")
    assert memory.title == "memory (MiB)"


def test_eval_charts_and_the_labelled_confusion_matrix() -> None:
    snap = snapshot_run(_state().runs["r1"])
    assert eval_chart(snap, "accuracy").data["value"].tolist() == [0.75, 0.8]
    assert eval_chart(snap, "ece").points == 0  # never reported: an empty chart, not a crash
    matrix = confusion_chart(snap.evals[0])
    assert matrix.spec["encoding"]["x"]["sort"] == LABELS
    cell = matrix.data[(matrix.data["true"] == "HIGH_RISK") & (matrix.data["predicted"] == "MEDIUM_RISK")]
    assert cell["count"].tolist() == [1] and len(matrix.data) == 16
    assert set(EVAL_CHARTS) >= {"loss", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost"}


def test_compare_overlays_runs_and_lists_only_differing_settings() -> None:
    a = snapshot_run(_state("a", lr=1e-3, steps=30).runs["a"])
    b = snapshot_run(_state("b", lr=5e-4, steps=20).runs["b"])
    chart = compare_train_chart([a, b], "loss")
    assert chart.data.groupby("run").size().to_dict() == {"a": 30, "b": 20}
    assert compare_eval_chart([a, b], "accuracy").data.groupby("run").size().to_dict() == {"a": 2, "b": 2}
    diff = config_diff({"a": a.summary.config, "b": b.summary.config})
    assert list(diff.index) == ["training.learning_rate"] and diff.loc["training.learning_rate"].tolist() == [
        "0.001",
        "0.0005",
    ]


def test_runs_table_shows_stalled_when_heartbeats_stop() -> None:
    state = _state()
    summary = snapshot_run(state.runs["r1"]).summary
    then = summary.last_event_time
    assert state_of(summary, then + 1) == "running"
    assert state_of(summary, then + STALL_AFTER_SECONDS + 1) == "stalled"
    row = runs_table([summary], then + STALL_AFTER_SECONDS + 1).iloc[0]
    assert row["state"] == "stalled" and row["step"] == "30 / 100" and row["progress"] == 0.3
    assert row["checkpoints"] == "0 approved, 1 rejected" and row["best accuracy"] == 0.8
    assert filter_runs([summary], then + 1, states=["stalled"]) == []
    assert filter_runs([summary], then + 1, name="R1") == [summary]
    assert age(90) == "2 min" and age(3) == "3 s"


def test_checkpoint_flag_and_command_tables() -> None:
    snap = snapshot_run(_state().runs["r1"])
    row = checkpoints_table([snap]).iloc[0]
    assert (row["verdict"], row["reasons"], row["accuracy"], row["sha256"]) == (
        "rejected",
        "critical_error_cost 0.7 > 0.5",
        0.8,
        SHA,
    )
    flags = flags_table([snap])
    assert flags[["rule", "severity", "step"]].values.tolist() == [["grad_norm_explosion", "warning", 12]]
    assert flags_table([snap], ["critical"]).empty
    history = commands_table(snap)
    assert history[["who", "what", "result"]].values.tolist() == [["alice", "pause", "applied at step 16"]]


def test_a_chat_run_charts_loss_and_perplexity_only() -> None:
    r = Run("chat")
    state = fold(
        r.started(),
        r(Evaluation, step=10, loss=2.0, perplexity=7.39),
        r(Evaluation, step=20, loss=1.0, perplexity=2.72),
    )
    snap = snapshot_run(state.runs["chat"])
    assert reported(snap.evals) == ["loss", "perplexity"]
    assert eval_chart(snap, "perplexity").data["value"].tolist() == [7.39, 2.72]
    assert list(eval_table(snap.evals).columns) == ["step", "trigger", "loss", "perplexity", "examples"]
    classifier = snapshot_run(_state().runs["r1"])
    assert reported(classifier.evals) == ["loss", "accuracy", "macro_f1"]
    assert reported([*snap.evals, *classifier.evals]) == ["loss", "perplexity", "accuracy", "macro_f1"]  # Compare


def test_an_evaluation_table_counts_abstentions() -> None:
    r = Run()
    state = fold(
        r.started(), r(Evaluation, step=10, loss=0.5, accuracy=0.5, abstain_rate=0.25, num_samples=8, num_abstained=2)
    )
    table = eval_table(snapshot_run(state.runs["r1"]).evals)
    assert table[["abstain_rate", "examples", "abstained"]].values.tolist() == [[0.25, 8, 2]]


def test_tags_notes_and_predictor_loads_in_tables() -> None:
    r = Run()
    ckpt = r(Checkpoint, step=20, path="/runs/c20", sha256=SHA, size_bytes=1 << 20)
    user = dict(source="user", issued_by="alice")
    loaded = dict(source="predictor", subject="trainbus.predict.risk", checkpoint_path="/runs/c20", sha256=SHA)
    state = fold(
        r.started(),
        r.step(20),
        ckpt,
        r(RunTag, tags={"team": "risk", "dataset": "v2"}, **user),
        r(RunNote, text="first try", **user),
        r(
            PredictorLoaded,
            alias="risk",
            step=20,
            checkpoint_event_id=ckpt.event_id,
            verdict="approved",
            instance="A",
            **loaded,
        ),
        r(PredictorLoaded, alias="canary", step=20, verdict="pending", forced=True, instance="B", host="h2", **loaded),
    )
    snap = snapshot_run(state.runs["r1"])
    assert runs_table([snap.summary], snap.summary.last_event_time).iloc[0]["tags"] == "team=risk, dataset=v2"
    assert notes_table(snap)[["step", "who", "note"]].values.tolist() == [[20, "alice", "first try"]]
    serving = serving_table([snap])
    assert serving[["alias", "run", "step", "verdict", "how", "replica"]].values.tolist() == [
        ["canary", "r1", 20, "pending (--force)", "start", "B"],
        ["risk", "r1", 20, "approved", "start", "A"],
    ]
    assert len(loads_table([snap])) == 2
    assert checkpoints_table([snap]).iloc[0]["loaded as"] == "canary, risk"


def test_the_probability_chart_has_a_bar_per_label_and_highlights_the_decision() -> None:
    chart = probability_chart({"HIGH_RISK": 0.7, "NO_RISK": 0.2, "null": 0.1}, "HIGH_RISK")
    assert chart.data.values.tolist() == [
        ["HIGH_RISK", 0.7, True],
        ["NO_RISK", 0.2, False],
        ["abstain (null)", 0.1, False],
    ]
    abstains = probability_chart({"HIGH_RISK": 0.4, "NO_RISK": 0.35, "null": 0.25}, None)
    assert abstains.data["decision"].tolist() == [False, False, True]


def test_the_learning_rate_tile_is_the_rate_in_use_and_names_the_peak() -> None:
    r = Run()
    state = fold(
        r.started(hyperparameters={"learning_rate": 3e-3}),
        r(TrainStep, step=430, epoch=1.0, loss=0.1, learning_rate=0.002988),
        r(CommandResult, command_id="s", command="set", status="applied", step=430, applied={"learning_rate": 1e-5}),
    )
    snap = snapshot_run(state.runs["r1"])
    tile = next(t for t in run_tiles(snap, snap.summary.last_event_time + 90) if t.label == "learning rate")
    assert (tile.value, tile.note) == ("0.00299", "peak 1e-5")
    since = run_tiles(snap, snap.summary.last_event_time + 90)[-1]
    assert (since.label, since.value) == ("since last event", "2 min")


def test_every_tile_value_fits_its_tile() -> None:
    values = [0.0, 1.0, 0.123456, 0.002988, 1.234e-5, -1.234e-5, 123456.789, 9.99e12, float("nan"), float("inf")]
    assert all(len(compact(v)) <= MOST_CHARS for v in values), [compact(v) for v in values]
    assert (compact(0.002988, 3), compact(1.234e-5), compact(None)) == ("0.00299", "1.23e-5", "–")
    r = Run()
    state = fold(r.started(max_steps=9_999_999), r.step(9_999_999, 1.23456789e-7))
    snap = snapshot_run(state.runs["r1"])
    tiles = run_tiles(snap, snap.summary.last_event_time + 86400 * 400)
    assert all(len(t.value) <= MOST_CHARS for t in tiles), [t.value for t in tiles]


def test_a_finished_run_says_why_its_controls_are_off_and_a_live_one_keeps_them() -> None:
    r = Run()
    live = summarise(fold(r.started(), r.step(12)).runs["r1"])
    assert closed_because(live, "") is None
    done = fold(r.started(), r.step(12), r(RunFinished, status="stopped", step=12, reason="stop by alice"))
    snap = snapshot_run(done.runs["r1"])
    assert closed_because(snap.summary, snap.reason) == (
        "Run **r1** stopped at step 12 (stop by alice): no trainer listens to it, so its controls are off. "
        "`trainbus train --resume r1` continues it from its last checkpoint."
    )


def test_a_runs_name_links_to_its_run_page() -> None:
    summary = snapshot_run(_state().runs["r1"]).summary
    assert runs_table([summary], summary.last_event_time).iloc[0]["run"] == "run?run=r1" == run_link("r1")
    assert re.fullmatch(RUN_LINK_TEXT, run_link("tiny-2027_01-01")).group(1) == "tiny-2027_01-01"  # type: ignore[union-attr]
