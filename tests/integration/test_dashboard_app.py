"""Every dashboard page through Streamlit's AppTest, against a real nats-server holding recorded runs.

The runs are written by the real publisher (``tests.integration.recorded_run``); the app reads
them through its one shared bus reader, as it does in production.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from dashboards.app import connection
from dashboards.app.control_panel import SENT
from dashboards.app.reader import BusReader
from dashboards.app.series import DISPLAY_POINTS
from dashboards.app.views.tryit import EXAMPLES
from runtime.bus.connect import BusTarget, Credentials
from runtime.bus.server import RunningServer, start_server
from runtime.cli.main import main as trainbus
from runtime.settings import BusSettings, ServerSettings, Settings
from schemas import RunFinished, RunStarted
from tests.conftest import REPO, wait_until
from tests.integration.recorded_run import (
    LABELS,
    SPIKE_STEP,
    Recorded,
    newer_event,
    point_best,
    publish_invalid,
    publish_raw,
    record_chat_run,
    record_loads,
    record_run,
)

MAIN = str(REPO / "dashboards/app/main.py")
LONG_STEPS = 5_000


@dataclass
class Bus:
    server: RunningServer
    monitoring: str
    recorded: Recorded
    long: Recorded
    other: Recorded
    unfinished: Recorded


def cli(url: str, *argv: str) -> None:
    """A `trainbus` command against ``url``, in this process."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NATS_URL", url)
        assert trainbus(list(argv)) == 0, argv


def _monitoring_url(server: RunningServer) -> str:
    ports = next((server.store_dir / "ports").glob("*.ports"))
    return str(json.loads(ports.read_text())["monitoring"][0])


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A server of this module's own (with monitoring, to count connections) holding three
    recorded classifier runs (two predictor replicas serving one, tags and a note on it), one that
    never finished (its trainer gone: commands reach nobody), a chat run, one message that is not
    an event and two events a newer trainbus wrote."""
    tmp = tmp_path_factory.mktemp("dashboard-bus")
    server = start_server(ServerSettings(), tmp / "nats", extra_config='http: "127.0.0.1:-1"\n', lock=False)
    settings = Settings(state_dir=str(tmp / ".trainbus"), bus=BusSettings(url=server.url))
    target = BusTarget([server.url], "test")
    try:
        recorded = record_run(target, settings, tmp, "recorded")
        long = record_run(target, settings, tmp, "long", steps=LONG_STEPS)
        other = record_run(target, settings, tmp, "other", steps=45, learning_rate=5e-4)
        unfinished = record_run(target, settings, tmp, "unfinished", steps=30, finish=False)
        record_chat_run(target, settings, tmp, "chat")
        record_loads(target, settings, tmp, recorded)
        publish_invalid(server.url, "trainbus.events.recorded.train.step")
        for step in (46, 47):  # stored as they are: valid events of a schema this trainbus does not know
            publish_invalid(server.url, "trainbus.events.other.train.step", newer_event("other", step))
        point_best(server.url, "recorded", recorded.approved_verdict_id)
        cli(server.url, "tag", "recorded", "team=risk", "dataset=v2")
        cli(server.url, "note", "recorded", "loss spike at 37: a bad batch?")
        yield Bus(server, _monitoring_url(server), recorded, long, other, unfinished)
    finally:
        connection._shared_reader.clear()  # stops the readers (on_release) before their server goes
        server.stop()


@pytest.fixture
def reader(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> BusReader:
    """The app's shared reader for this bus, once it has replayed the whole stream."""
    monkeypatch.setenv("NATS_URL", bus.server.url)
    shared = connection._shared_reader(bus.server.url, None)
    wait_until(lambda: shared.overview().bus.caught_up, what="the dashboard to replay the stream")
    return shared


def page(path: str | None = None, **query: str) -> AppTest:
    """A fresh browser session opened on ``path`` (e.g. ``views/run.py``) with ``?query``."""
    at = AppTest.from_file(MAIN, default_timeout=60)
    if path is not None:
        at.switch_page(path)
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
    """Every chart on the page by title: its data and its Vega-Lite spec."""
    out = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["title"]["text"]] = (dataframe_util.convert_arrow_bytes_to_pandas_df(chart.proto.data.data), spec)
    return out


def frame(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first table on the page that has all of ``columns``."""
    frames = [d.value for d in at.dataframe]
    found = next((f for f in frames if set(columns) <= set(f.columns)), None)
    assert found is not None, [list(f.columns) for f in frames]
    return found


def runs_shown(at: AppTest) -> pd.DataFrame:
    """The Runs page's table, indexed by run id (each row's ``run`` is the link to the run's page)."""
    table = at.dataframe[0].value
    assert table["run"].str.fullmatch(r"run\?run=[A-Za-z0-9_-]+").all(), table["run"].tolist()
    return table.assign(run=table["run"].str.removeprefix("run?run=")).set_index("run")


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def button(at: AppTest, label: str) -> Any:
    return next(b for b in at.button if b.label == label)


def test_runs_page_lists_every_run_with_state_progress_and_verdicts(reader: BusReader) -> None:
    at = page()
    table = runs_shown(at)
    row = table.loc["recorded"]
    assert (row["state"], row["step"], row["progress"], row["attempt"]) == ("completed", "60 / 60", 1.0, 1)
    assert (row["best accuracy"], row["checkpoints"]) == (0.9, "1 approved, 1 rejected")
    assert row["loss"] == pytest.approx(2.0 * 2.718281828 ** (-60 / 40) + 0.1, rel=1e-6)
    assert row["last event"].endswith(" ago")
    assert {"recorded", "long", "other"} <= set(table.index)


def test_runs_page_filters_by_state_and_name(reader: BusReader) -> None:
    at = page()
    at.text_input(key="runs-name").input("oth").run()
    assert runs_shown(at).index.tolist() == ["other"]
    at.text_input(key="runs-name").input("").run()
    at.multiselect(key="runs-states").select("completed").run()
    assert {"recorded", "long", "other"} <= set(runs_shown(at).index)
    at.multiselect(key="runs-states").unselect("completed").select("running").run()
    assert not {"recorded", "long", "other"} & set(runs_shown(at).index)


def test_a_runs_name_is_a_link_to_its_page(reader: BusReader) -> None:
    at = page()
    table = at.dataframe[0]
    assert "other" in runs_shown(at).index and "run?run=other" in table.value["run"].tolist()
    column = json.loads(table.proto.columns)["run"]
    assert column["type_config"] == {"type": "link", "display_text": r"run\?run=(.+)"}  # shows the run id
    assert not table.proto.selection_mode  # no checkbox column: the name is what opens a run
    opened = page("views/run.py", run="other")  # where the link leads
    assert any(s.value.startswith(":material/check_circle: other") for s in opened.subheader), texts(opened.subheader)


def test_run_page_charts_every_step_with_markers_from_the_replay(reader: BusReader, bus: Bus) -> None:
    at = page("views/run.py", run="recorded")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["step"] == "60" and metrics["attempt"] == "1"
    shown = charts(at)
    assert set(shown) == {"train loss", "learning rate", "grad norm", "tokens/s", "samples/s", "memory (MiB)"}
    loss, spec = shown["train loss"]
    assert len(loss) == bus.recorded.steps and loss["value"].max() == 20.0
    markers = {(m["kind"], m["step"]) for m in spec["layer"][1]["data"]["values"]}
    assert {("flag", float(SPIKE_STEP)), ("command", 40.0)} <= markers
    assert shown["memory (MiB)"][0]["value"].tolist()[0] == 200.0


def test_a_long_run_is_thinned_for_display_and_keeps_its_spike(reader: BusReader) -> None:
    at = page("views/run.py", run="long")
    loss, _ = charts(at)["train loss"]
    assert len(loss) <= DISPLAY_POINTS and loss["step"].max() == LONG_STEPS
    assert loss["value"].max() == 20.0  # the spike at one step in 5,000 is still drawn


def test_evaluation_tab_confusion_matrix_and_per_label_f1(reader: BusReader) -> None:
    at = page("views/run.py", run="recorded")
    at.session_state["tab"] = "Evaluation"
    at.run()
    shown = charts(at)
    accuracy, _ = shown["accuracy"]
    assert accuracy[["step", "value"]].values.tolist() == [[30.0, 0.5], [60.0, 0.9]]
    matrix, spec = shown["confusion matrix at step 60"]
    assert spec["encoding"]["y"]["sort"] == LABELS
    assert sorted(set(matrix["true"])) == sorted(LABELS) and sorted(set(matrix["predicted"])) == sorted(LABELS)
    assert matrix[matrix["true"] == matrix["predicted"]]["count"].tolist() == [4, 4, 4, 4]
    per_label = at.dataframe[0].value
    assert per_label["label"].tolist() == LABELS and per_label["F1"].tolist() == [0.9] * 4
    at.selectbox(key="eval-pick-recorded").select("step 30 (scheduled, attempt 1)").run()
    assert "confusion matrix at step 30" in charts(at)


def test_config_tab_shows_live_hyperparameters(reader: BusReader) -> None:
    at = page("views/run.py", run="recorded")
    at.session_state["tab"] = "Config"
    at.run()
    live = dict(at.dataframe[0].value.values.tolist())
    assert live["learning_rate"] == "0.001"  # set to half of 2e-3 at step 40
    assert json.loads(at.json[0].value)["training"]["max_steps"] == 60


def test_commands_tab_shows_the_history_from_the_stream(reader: BusReader) -> None:
    at = page("views/run.py", run="recorded")
    at.session_state["tab"] = "Commands"
    at.run()
    history = at.dataframe[0].value[["who", "what", "result"]].values.tolist()
    assert ["alice", "pause", "applied at step 40"] in history
    assert ["bob", "pause", "rejected (not_applicable): already paused"] in history
    assert ["alice", "set learning_rate=0.001", "applied at step 40"] in history


def test_compare_page_overlays_runs_and_shows_config_differences(reader: BusReader) -> None:
    at = page("views/compare.py")
    at.multiselect(key="compare-runs").set_value(["recorded", "other"]).run()
    loss, _ = charts(at)["train loss"]
    assert loss.groupby("run").size().to_dict() == {"recorded": 60, "other": 45}
    accuracy, _ = charts(at)["accuracy"]
    assert sorted(set(accuracy["run"])) == ["other", "recorded"]
    diff = at.dataframe[0].value
    assert {"training.learning_rate", "training.max_steps", "run_name"} <= set(diff.index)
    assert diff.loc["training.learning_rate"].tolist() == ["0.002", "0.0005"]


def test_checkpoints_page_verdicts_reasons_best_and_flags(reader: BusReader, bus: Bus) -> None:
    wait_until(lambda: (s := reader.run("recorded")) is not None and s.best_verdict, what="the best pointer")
    at = page("views/checkpoints.py", run="recorded")
    checkpoints = at.dataframe[0].value.set_index("step")
    approved = checkpoints.loc[bus.recorded.approved_step]
    assert (approved["verdict"], approved["best"]) == ("approved", "★")
    rejected = checkpoints.loc[bus.recorded.rejected_step]
    assert rejected["verdict"] == "rejected" and rejected["reasons"] == "; ".join(bus.recorded.rejected_reasons)
    assert rejected["best"] == ""
    assert rejected["sha256"] == "ab" * 32 and rejected["path"].endswith("checkpoint-30")
    flags = frame(at, "rule", "severity")
    assert flags[["run", "rule", "severity", "step"]].values.tolist() == [
        ["recorded", "loss_spike", "critical", SPIKE_STEP]
    ]


def test_an_invalid_event_is_counted_and_skipped(reader: BusReader) -> None:
    at = page()
    assert reader.overview().invalid_events == 1
    warning = texts(at.warning)
    assert any("1 invalid event skipped" in w and "trainbus.events.recorded.train.step" in w for w in warning), warning
    assert not at.exception and not at.error


def test_one_bus_connection_serves_every_session_and_rerun(reader: BusReader, bus: Bus) -> None:
    sessions = [page("views/run.py", run="recorded"), page(), page("views/compare.py"), page("views/tryit.py")]
    for at in sessions:
        at.run()
        at.run()
    tryit = sessions[-1]  # its discovery of predictors went out on the reader's connection
    wait_until(lambda: tryit.run() and any("No predictor is serving" in i for i in texts(tryit.info)), what="discovery")
    with urllib.request.urlopen(f"{bus.monitoring}/connz?limit=1000", timeout=10) as reply:
        names = [c.get("name") for c in json.load(reply)["connections"]]
    assert names.count("trainbus-dashboard") == 1, names


def test_the_learning_rate_tile_is_the_rate_in_use_with_the_peak_beside_it(reader: BusReader) -> None:
    at = page("views/run.py", run="recorded")
    tile = next(m for m in at.metric if m.label == "learning rate")
    assert (tile.value, tile.delta) == ("0", "peak 0.001")  # the schedule ended at 0; set halved the peak at 40
    chart, _ = charts(at)["learning rate"]
    assert chart["value"].iloc[-1] == 0.0 and chart["value"].max() == pytest.approx(2e-3 * (1 - 1 / 60))
    assert {m.label for m in at.metric} == {
        "step",
        "loss",
        "learning rate",
        "best accuracy",
        "attempt",
        "since last event",
    }
    assert all(len(m.value) <= 7 for m in at.metric), [m.value for m in at.metric]  # st.metric would cut them


def test_a_finished_run_shows_its_controls_off_with_the_reason(reader: BusReader) -> None:
    at = page("views/run.py", run="recorded")
    controls = ["Pause", "Resume", "Save checkpoint", "Evaluate", "Stop", "Set"]
    assert all(button(at, label).disabled for label in controls)
    assert all(n.disabled for n in at.number_input)
    assert any(
        "Run **recorded** completed at step 60 (max_steps reached): no trainer listens to it" in i
        and "`trainbus train --resume recorded`" in i
        for i in texts(at.info)
    ), texts(at.info)
    live = page("views/run.py", run="unfinished")
    assert not any(button(live, label).disabled for label in controls)
    assert not any("no trainer listens" in i for i in texts(live.info))


def test_a_run_that_finishes_while_its_page_is_open_turns_its_controls_off(
    reader: BusReader, bus: Bus, tmp_path: Path
) -> None:
    settings = Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=bus.server.url))
    record_run(BusTarget([bus.server.url], "test"), settings, tmp_path, "finishing", steps=30, finish=False)
    wait_until(lambda: reader.run("finishing") is not None, what="the run")
    at = page("views/run.py", run="finishing")
    assert not button(at, "Pause").disabled
    finished = RunFinished(
        event_id="finishing.1.9999", run_id="finishing", seq=9999, status="failed", step=30, error="CUDA out of memory"
    )
    publish_raw(bus.server.url, "trainbus.events.finishing.run.finished", finished.model_dump_json().encode())
    wait_until(lambda: (s := reader.run("finishing")) is not None and s.summary.finished, what="the run.finished")
    at.run()  # the header notices first and redraws the page once (not again and again)
    assert not at.exception and button(at, "Pause").disabled
    assert any("Run **finishing** failed at step 30 (CUDA out of memory)" in i for i in texts(at.info)), texts(at.info)


def test_without_a_trainer_the_panel_says_nobody_listens_and_shows_no_success(reader: BusReader) -> None:
    at = page("views/run.py", run="unfinished")
    button(at, "Pause").click().run()
    sent = at.session_state[SENT]
    wait_until(lambda: sent[-1].future.done(), what="the pause to be answered")
    at.run()
    assert any("no trainer is listening for run 'unfinished'" in w for w in texts(at.warning)), texts(at.warning)
    assert not at.success


def test_stop_asks_for_confirmation_first(reader: BusReader) -> None:
    at = page("views/run.py", run="unfinished")
    button(at, "Stop").click().run()
    assert any("Stop run **unfinished**?" in w for w in texts(at.warning))
    assert SENT not in at.session_state
    button(at, "Cancel").click().run()
    assert not any("Stop run" in w for w in texts(at.warning)) and SENT not in at.session_state
    button(at, "Stop").click().run()
    button(at, "Confirm stop").click().run()
    assert [s.what for s in at.session_state[SENT]] == ["stop"]


def test_set_needs_a_value(reader: BusReader) -> None:
    at = page("views/run.py", run="unfinished")
    button(at, "Set").click().run()
    assert any("Enter at least one value" in w for w in texts(at.warning)) and SENT not in at.session_state


def test_a_lost_bus_shows_a_banner_naming_the_url_and_the_reader_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    port = int(first.url.rsplit(":", 1)[1])
    settings = Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=first.url))
    record_run(BusTarget([first.url], "test"), settings, tmp_path, "before")
    monkeypatch.setenv("NATS_URL", first.url)
    shared = connection._shared_reader(first.url, None)
    again: RunningServer | None = None
    try:
        wait_until(lambda: shared.run("before") is not None, what="the first run")
        first.stop()
        wait_until(lambda: not shared.bus_status().connected, what="the reader to notice the lost bus")
        errors = texts(page().error)
        assert any(f"No connection to the bus at **{first.url}**" in e and "reconnecting" in e for e in errors), errors
        again = start_server(ServerSettings(port=port), tmp_path / "nats", lock=False)
        record_run(BusTarget([again.url], "test"), settings, tmp_path, "after")
        wait_until(lambda: shared.run("after") is not None, timeout=60, what="events published after the restart")
        at = page()
        assert not at.error and set(runs_shown(at).index) == {"before", "after"}
    finally:
        shared.close()
        first.stop()
        if again is not None:
            again.stop()


def test_a_viewer_is_told_the_server_denied_the_command_and_sees_no_success(
    secured_server: RunningServer, role_passwords: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = secured_server.url
    settings = Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=url))
    admin = Credentials(user="admin", password=role_passwords["admin"])
    record_run(BusTarget([url], "test"), settings, tmp_path, "guarded", finish=False, credentials=admin)
    monkeypatch.setenv("NATS_URL", url)
    monkeypatch.setenv("NATS_USER", "viewer")
    monkeypatch.setenv("NATS_PASSWORD", role_passwords["viewer"])
    shared = connection._shared_reader(url, "viewer")
    try:
        wait_until(lambda: shared.run("guarded") is not None, what="the viewer's dashboard to read the run")
        at = page("views/run.py", run="guarded")
        button(at, "Pause").click().run()
        sent = at.session_state[SENT]
        wait_until(lambda: sent[-1].future.done(), what="the server's answer")
        at.run()
        errors = texts(at.error)
        assert any(
            "pause: not allowed" in e and "denied viewer sending commands to trainbus.control.guarded" in e
            and "operator role" in e
            for e in errors
        ), errors  # fmt: skip
        assert not at.success and not any("accepted" in i for i in texts(at.info))
    finally:
        shared.close()


def test_a_run_page_opened_before_its_run_starts_comes_alive(reader: BusReader, bus: Bus, tmp_path: Path) -> None:
    at = page("views/run.py", run="late")
    assert any("Waiting for run **late**" in i for i in texts(at.info)), texts(at.info)
    settings = Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=bus.server.url))
    record_run(BusTarget([bus.server.url], "test"), settings, tmp_path, "late")
    wait_until(lambda: reader.run("late") is not None, what="the late run")
    at.run()
    assert {m.label: m.value for m in at.metric}["step"] == "60"


def test_a_chat_run_charts_loss_and_perplexity_and_shows_no_empty_panel(reader: BusReader) -> None:
    at = page("views/run.py", run="chat")
    assert {m.label: m.value for m in at.metric}["best perplexity"] == f"{math.exp(1.0):.4g}"
    at.session_state["tab"] = "Evaluation"
    at.run()
    shown = charts(at)
    assert set(shown) == {"eval loss", "perplexity"}
    assert shown["perplexity"][0]["value"].tolist() == pytest.approx([math.exp(1.5), math.exp(1.0)])
    assert not [c.value for c in at.caption if "no data yet" in c.value]
    assert [b.label for b in at.selectbox] == ["Run"]  # no evaluation to pick a confusion matrix of
    assert len(at.dataframe) == 1 and not [c for c in charts(at) if c.startswith("confusion")]
    assert list(at.dataframe[0].value.columns) == ["step", "trigger", "loss", "perplexity", "examples"]
    compare = page("views/compare.py")
    compare.multiselect(key="compare-runs").set_value(["chat", "recorded"]).run()
    assert {"eval loss", "perplexity", "accuracy", "macro-F1"} <= set(charts(compare))
    assert not [c.value for c in compare.caption if "no data yet" in c.value]


def test_tags_on_the_runs_and_run_pages_and_notes_as_markers_and_a_feed(reader: BusReader) -> None:
    wait_until(lambda: (s := reader.run("recorded")) is not None and s.notes, what="the note")
    table = runs_shown(page())
    assert table.loc["recorded", "tags"] == "team=risk, dataset=v2" and table.loc["other", "tags"] == ""
    at = page("views/run.py", run="recorded")
    assert "tags: team=risk, dataset=v2" in texts(at.text)
    _, spec = charts(at)["train loss"]
    assert ("note", 60.0, "loss spike at 37: a bad batch?") in {
        (m["kind"], m["step"], m["label"]) for m in spec["layer"][1]["data"]["values"]
    }
    at.session_state["tab"] = "Notes"
    at.run()
    notes = frame(at, "note")
    assert notes[["step", "note"]].values.tolist() == [[60, "loss spike at 37: a bad batch?"]] and notes["who"][0]


def test_an_event_of_a_newer_schema_is_skipped_and_reported_once_not_counted_invalid(reader: BusReader) -> None:
    at = page()
    assert (reader.overview().newer_events, reader.overview().invalid_events) == (2, 1)
    newer = [i for i in texts(at.info) if "newer trainbus" in i]
    assert newer == ["2 events written by a newer trainbus skipped: upgrade trainbus to read them."]
    assert any("1 invalid event skipped" in w for w in texts(at.warning))
    other = page("views/run.py", run="other")
    assert {m.label: m.value for m in other.metric}["step"] == "45"  # the newer steps 46 and 47 are not folded in


def test_the_checkpoints_page_shows_which_checkpoint_each_predictor_serves_since_when(
    reader: BusReader, bus: Bus
) -> None:
    at = page("views/checkpoints.py", run="recorded")
    serving = frame(at, "alias", "replica")
    assert sorted(serving["replica"]) == ["replica-a", "replica-b"]
    assert set(zip(serving["alias"], serving["step"], serving["verdict"], serving["how"], strict=True)) == {
        ("risk", bus.recorded.approved_step, "approved", "start")
    }
    assert all(serving["since"].str.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"))
    checkpoints = frame(at, "verdict", "loaded as").set_index("step")
    assert checkpoints.loc[bus.recorded.approved_step, "loaded as"] == "risk"
    assert checkpoints.loc[bus.recorded.rejected_step, "loaded as"] == ""


def test_a_run_removed_with_runs_rm_leaves_the_running_dashboard(reader: BusReader, bus: Bus, tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=bus.server.url))
    record_run(BusTarget([bus.server.url], "test"), settings, tmp_path, "doomed", steps=30)
    wait_until(lambda: reader.run("doomed") is not None, what="the run to be read")
    assert "doomed" in runs_shown(page()).index
    cli(bus.server.url, "runs", "rm", "doomed", "--yes")
    wait_until(lambda: reader.run("doomed") is None, timeout=30, what="the dashboard to drop the removed run")
    listed = runs_shown(page()).index.tolist()
    assert "doomed" not in listed and {"recorded", "long", "other", "chat"} <= set(listed)
    gone = page("views/run.py", run="doomed")
    assert any("Run **doomed** was removed from the bus" in i for i in texts(gone.info)), texts(gone.info)
    resumed = RunStarted(
        event_id="doomed.2.1", run_id="doomed", attempt=2, seq=1, config={}, config_hash="h", model="tiny",
        adapter="lora", data_fingerprint="d", hyperparameters={"learning_rate": 1e-3}, max_steps=30,
    )  # fmt: skip
    publish_raw(bus.server.url, "trainbus.events.doomed.run.started", resumed.model_dump_json().encode())
    again = wait_until(lambda: reader.run("doomed"), what="the run publishing again")
    assert (again.summary.attempt, again.summary.step, again.evals) == (2, 0, ())  # only what came after the purge


def test_try_it_without_a_predictor_says_how_to_start_one(reader: BusReader) -> None:
    at = page("views/tryit.py")
    wait_until(lambda: at.run() and any("No predictor is serving" in i for i in texts(at.info)), what="the discovery")
    assert [t.value for t in at.title] == ["Try it"] and not at.markdown  # nothing stray drawn around it
    message = next(i for i in texts(at.info) if "No predictor is serving" in i)
    assert (
        "`trainbus serve --run RUN`" in message and "`trainbus serve --run recorded`" in message
    )  # its best is approved
    assert [b.label for b in at.button if (b.key or "").startswith("tryit-example-")] == [text for text, _ in EXAMPLES]
    button(at, "Nice weather today.").click().run()  # an example fills the text field
    assert at.text_area(key="tryit-text").value == "Nice weather today."
    button(at, "Predict").click().run()
    assert any("No served model to ask" in w for w in texts(at.warning)) and not at.error
