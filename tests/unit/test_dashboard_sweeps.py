"""The dashboard's sweep views as pure functions: a real Optuna study (SQLite) as the driver writes
it, runs folded from tagged ``run.started`` events, and the table, charts and Runs filter built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from consumers.sweep.space import load_space
from consumers.sweep.study import default_storage, open_study, record_outcome, study_names, sweep_data
from dashboards.app.snapshot import RunSummary, summarise
from dashboards.app.state import DashboardState, handle
from dashboards.app.sweeps import objective_chart, parameter_chart, trials_table
from dashboards.app.tables import filter_runs, run_link, runs_table, sweep_names
from schemas import Hyperparameters, RunStarted, SweepTag

SPACE = "parameters:\n  training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n  adapter.r: [8, 16]\n"


def started(run_id: str, sweep: SweepTag | None) -> RunStarted:
    return RunStarted(
        event_id=f"{run_id}.1.1", run_id=run_id, seq=1, config={}, config_hash="h", model="tiny", adapter="lora",
        data_fingerprint="d", hyperparameters=Hyperparameters(learning_rate=0.003), max_steps=30, sweep=sweep,
    )  # fmt: skip


def summaries(*events: RunStarted) -> dict[str, RunSummary]:
    state = DashboardState()
    for event in events:
        handle(event, state)
    return {run_id: summarise(run) for run_id, run in state.runs.items()}


@pytest.fixture
def sweep(tmp_path: Path) -> dict[str, Any]:
    """Trials 0 (complete), 1 (pruned), 2 (fail) and 3 (running) of sweep ``sw``."""
    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_space(tmp_path / "space.yaml")
    url = default_storage(str(tmp_path / "state"))
    study = open_study("sw", url, space, "configs/tiny.yaml", [])
    fixed = [{"training.learning_rate": 1e-3, "adapter.r": 8}, {"training.learning_rate": 1e-4, "adapter.r": 16}]
    fixed += [{"training.learning_rate": 5e-3, "adapter.r": 16}, {"training.learning_rate": 2e-3, "adapter.r": 8}]
    for number, params in enumerate(fixed):
        study.enqueue_trial(params)
        trial = study.ask(dict(space.parameters))
        trial.set_user_attr("run_id", f"sw-t{number}")
        if number == 1:
            trial.report(0.2, 10)
    record_outcome(study, 0, "complete", 0.9, reason="", checkpoint="/runs/sw-t0/checkpoint-30", verdict="approved")
    record_outcome(study, 1, "pruned", None, reason="pruned at step 10 (accuracy 0.2)")
    record_outcome(
        study, 2, "fail", 0.0, reason="last checkpoint (step 30) rejected: accuracy_floor", verdict="rejected"
    )
    data = sweep_data(url, "sw")
    assert data is not None
    return data


def test_the_trials_table_has_state_objective_run_progress_and_every_parameter(sweep: dict[str, Any]) -> None:
    runs = summaries(started("sw-t3", SweepTag(name="sw", trial=3)))
    table = trials_table(sweep, runs).set_index("trial")
    assert list(table.columns) == ["state", "accuracy", "run", "step", "training.learning_rate", "adapter.r", "verdict", "reason"]  # fmt: skip
    assert table["state"].tolist() == ["complete", "pruned", "fail", "running"]
    assert table.loc[0, "accuracy"] == 0.9 and table.loc[0, "verdict"] == "approved"
    assert table.loc[1, "accuracy"] == 0.2  # a pruned trial keeps its last report
    assert pd.isna(table.loc[2, "accuracy"]) and table.loc[2, "reason"].startswith("last checkpoint (step 30) rejected")
    assert table.loc[3, "step"] == "0 / 30"  # the running trial's progress comes from the bus
    assert table.loc[1, "training.learning_rate"] == 1e-4 and table.loc[1, "adapter.r"] == 16
    assert sweep["best"] == 0 and (sweep["metric"], sweep["direction"]) == ("accuracy", "maximize")


def test_the_charts_plot_the_objective_per_trial_and_against_each_parameter(sweep: dict[str, Any]) -> None:
    per_trial = objective_chart(sweep)
    assert per_trial.title == "accuracy per trial (maximize)"
    assert per_trial.data[["trial", "objective", "state"]].values.tolist() == [[0, 0.9, "complete"], [1, 0.2, "pruned"]]
    lr = parameter_chart(sweep, "training.learning_rate")
    assert lr.title == "accuracy against training.learning_rate"
    assert lr.spec["encoding"]["x"]["scale"] == {"type": "log"}  # sampled on a log scale, drawn on one
    assert lr.data["value"].tolist() == [1e-3, 1e-4]
    rank = parameter_chart(sweep, "adapter.r")
    assert rank.spec["encoding"]["x"]["type"] == "nominal" and rank.data["value"].tolist() == ["8", "16"]


def test_the_runs_page_filters_by_sweep_and_shows_the_trial(sweep: dict[str, Any]) -> None:
    runs = summaries(
        started("sw-t0", SweepTag(name="sw", trial=0)),
        started("other-t0", SweepTag(name="other", trial=0)),
        started("plain", None),
    )
    assert sweep_names(runs.values()) == ["other", "sw"]
    now = runs["plain"].last_event_time + 1
    assert [r.run_id for r in filter_runs(runs.values(), now, sweep="sw")] == ["sw-t0"]
    assert len(filter_runs(runs.values(), now)) == 3
    table = runs_table(runs.values(), now).set_index("run")
    assert (table.loc[run_link("sw-t0"), "sweep"], table.loc[run_link("plain"), "sweep"]) == ("sw #0", "")
    assert "sweep" not in runs_table([runs["plain"]], now).columns  # no column while no run is a trial


def test_a_missing_storage_file_lists_no_sweeps_and_is_not_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'none' / 'sweeps.db'}"
    assert study_names(url) == [] and sweep_data(url, "sw") is None
    assert not (tmp_path / "none").exists()
    optuna.create_study(study_name="x", storage=f"sqlite:///{tmp_path / 'x.db'}")
    assert study_names(f"sqlite:///{tmp_path / 'x.db'}") == ["x"]
