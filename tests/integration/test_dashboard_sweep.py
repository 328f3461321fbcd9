"""The dashboard's Sweep page and the Runs page's sweep filter through Streamlit's AppTest, against a
real nats-server holding a sweep's trial runs (written by the real publisher) and the sweep's real
Optuna study in the state folder's SQLite file, where `trainbus sweep` keeps it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from consumers.sweep.space import load_space
from consumers.sweep.study import default_storage, open_study, record_outcome
from dashboards.app import connection
from dashboards.app.tables import run_link
from runtime.bus.connect import BusTarget
from runtime.bus.server import RunningServer, start_server
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, ServerSettings, Settings
from schemas import Evaluation, Hyperparameters, RunFinished, RunStarted, SweepTag
from tests.conftest import REPO, wait_until
from tests.publishing import OutboxPublisher

MAIN = str(REPO / "dashboards/app/main.py")
RUNS = {"lr-t0": (0.003, 0.9), "lr-t1": (0.0001, 0.2), "solo": (0.002, 0.5)}


def publish_runs(server: RunningServer, tmp: Path) -> None:
    settings = Settings(state_dir=str(tmp / ".trainbus"), bus=BusSettings(url=server.url))
    publisher = OutboxPublisher(BusTarget([server.url], "test"), settings, outbox_path=tmp / "outbox.jsonl")
    for run_id, (lr, accuracy) in RUNS.items():
        trainer = Stamper(publisher, run_id)
        sweep = SweepTag(name="lr", trial=int(run_id[-1])) if run_id.startswith("lr-") else None
        trainer.emit(
            RunStarted, config={"training": {"learning_rate": lr}}, config_hash="c", model="tiny", adapter="lora",
            data_fingerprint="d", hyperparameters=Hyperparameters(learning_rate=lr), max_steps=20, sweep=sweep,
        )  # fmt: skip
        trainer.emit(Evaluation, step=20, loss=1.0, accuracy=accuracy)
        trainer.emit(RunFinished, status="completed", step=20)
    stats = publisher.close(timeout=30)
    assert stats.outbox_pending == 0


@pytest.fixture(scope="module")
def sweep_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("dashboard-sweep")
    server = start_server(ServerSettings(), tmp / "nats", lock=False)
    try:
        publish_runs(server, tmp)
        (tmp / "space.yaml").write_text(
            "parameters:\n  training.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}\n"
        )
        space = load_space(tmp / "space.yaml")
        study = open_study("lr", default_storage(str(tmp / "state")), space, "configs/tiny.yaml", [])
        for run_id in ("lr-t0", "lr-t1"):
            study.enqueue_trial({"training.learning_rate": RUNS[run_id][0]})
            study.ask(dict(space.parameters)).set_user_attr("run_id", run_id)
        record_outcome(study, 0, "complete", 0.9, reason="", checkpoint="/runs/lr-t0/checkpoint-20", verdict="approved")
        record_outcome(study, 1, "fail", None, reason="last checkpoint (step 20) rejected: accuracy_floor")
        yield server, tmp
    finally:
        connection._shared_reader.clear()  # stops the readers before their server goes
        server.stop()


@pytest.fixture
def app_env(sweep_bus: tuple[RunningServer, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    server, tmp = sweep_bus
    monkeypatch.setenv("NATS_URL", server.url)
    shared = connection._shared_reader(server.url, None)
    wait_until(lambda: len(shared.overview().runs) == len(RUNS), what="the dashboard to replay the runs")
    return tmp


def page(path: str, **query: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.switch_page(path)
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


def test_sweep_page_shows_each_trial_its_objective_and_parameters_and_links_its_run(app_env: Path) -> None:
    at = page("views/sweep.py")
    assert at.text_input(key="sweep-storage").value.endswith("/.trainbus/sweeps.db")  # trainbus sweep's default
    at.text_input(key="sweep-storage").input(f"sqlite:///{app_env / 'state' / 'sweeps.db'}").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="sweep-name").value == "lr"
    table = at.dataframe[0].value.set_index("trial")
    assert table["state"].tolist() == ["complete", "fail"]
    assert table.loc[0, "accuracy"] == 0.9 and table.loc[0, "run"] == "lr-t0" and table.loc[0, "step"] == "20 / 20"
    assert table.loc[1, "training.learning_rate"] == 0.0001 and table.loc[1, "reason"].startswith("last checkpoint")
    titles = [json.loads(chart.proto.spec)["title"]["text"] for chart in at.get("vega_lite_chart")]
    assert titles == ["accuracy per trial (maximize)", "accuracy against training.learning_rate"]
    links = {link.proto.label: link.proto.page for link in at.get("page_link")}
    assert set(links) == {"trial 0 · lr-t0 (complete)", "trial 1 · lr-t1 (fail)"}
    hrefs = [link.proto.query_string for link in at.get("page_link")]
    assert hrefs == ["run=lr-t0", "run=lr-t1"]  # each opens its run on the Run page


def test_a_sweep_whose_study_is_elsewhere_still_lists_its_runs_from_the_bus(app_env: Path) -> None:
    at = page("views/sweep.py")
    at.text_input(key="sweep-storage").input(f"sqlite:///{app_env / 'elsewhere.db'}").run()
    assert not at.exception, at.exception
    assert any("is not in sqlite:///" in str(i.value) for i in at.info), [i.value for i in at.info]
    assert [link.proto.label for link in at.get("page_link")][-2:] == ["trial 0 · lr-t0 (completed)", "trial 1 · lr-t1 (completed)"]  # fmt: skip
    assert not (app_env / "elsewhere.db").exists()


def test_runs_page_filters_by_sweep(app_env: Path) -> None:
    at = page("views/runs.py")
    assert set(at.dataframe[0].value["run"]) == {run_link(run) for run in RUNS}
    at.selectbox(key="runs-sweep").select("lr").run()
    table = at.dataframe[0].value
    assert sorted(table["run"]) == [run_link("lr-t0"), run_link("lr-t1")]
    assert sorted(table["sweep"]) == ["lr #0", "lr #1"]
