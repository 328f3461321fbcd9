"""Groups of runs computed by hand on recorded runs with unequal logging steps equal what
`trainbus runs --group-by` prints as CSV and what the dashboard's Compare page shows."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from streamlit.testing.v1 import AppTest

from dashboards.app import connection
from dashboards.app.group_charts import group_train_chart, groups_of
from dashboards.app.reader import BusReader
from runtime.bus.server import RunningServer, start_server
from runtime.cli.main import main as trainbus
from runtime.publish.sinks import MemorySink, Stamper
from runtime.settings import ServerSettings
from schemas import Evaluation, Event, RunFinished, RunStarted, TrainStep
from tests.conftest import REPO, wait_until
from tests.integration.recorded_streams import HP, Stream, publish

MAIN = str(REPO / "dashboards/app/main.py")


@dataclass(frozen=True)
class Member:
    run_id: str
    r: int
    seed: int
    every: int
    """Its logging interval: the members of group r=16 log every 5 and every 10 steps."""

    def loss(self, step: int) -> float:
        return 2.0 / (step + 1) + 0.05 * self.seed + 0.001 * self.r

    def accuracy(self) -> float:
        return 0.5 + 0.01 * self.r + 0.02 * self.seed


MEMBERS = [Member("g8-s1", 8, 1, 5), Member("g8-s2", 8, 2, 5), Member("g16-s1", 16, 1, 5), Member("g16-s2", 16, 2, 10)]
STEPS = 40


def events_of(member: Member, now: datetime) -> list[Event]:
    trainer = Stamper(MemorySink(), member.run_id)
    t = now - timedelta(seconds=100)
    config = {"adapter": {"r": member.r, "method": "lora"}, "training": {"seed": member.seed, "max_steps": STEPS}}
    events = [trainer.emit(RunStarted, config=config, config_hash=member.run_id, model="tiny", adapter="lora",
                           data_fingerprint="d", hyperparameters=HP, max_steps=STEPS, time=t)]  # fmt: skip
    for step in range(member.every, STEPS + 1, member.every):
        events.append(trainer.emit(TrainStep, step=step, epoch=step / STEPS, loss=member.loss(step), learning_rate=1e-3,
                                   hyperparameters=HP, time=t + timedelta(seconds=step)))  # fmt: skip
    events.append(trainer.emit(Evaluation, step=STEPS, loss=0.3, accuracy=member.accuracy(), num_samples=10, time=t + timedelta(seconds=50)))  # fmt: skip
    events.append(trainer.emit(RunFinished, status="completed", step=STEPS, time=t + timedelta(seconds=51)))
    return events


def by_hand(r: int) -> dict[str, statistics.StatisticsError | tuple[float, float, float, float]]:
    members = [m for m in MEMBERS if m.r == r]
    values = {
        "step": [float(STEPS)] * len(members),
        "loss": [m.loss(STEPS) for m in members],  # the latest logged loss: every member logs step 40
        "eval_accuracy": [m.accuracy() for m in members],
    }
    return {k: (statistics.mean(v), statistics.stdev(v), min(v), max(v)) for k, v in values.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(ServerSettings(), tmp_path_factory.mktemp("groups") / "nats", lock=False)
    now = datetime.now(UTC)
    publish(server.url, [Stream(m.run_id, events_of(m, now), "completed", STEPS, 1) for m in MEMBERS])
    try:
        yield server
    finally:
        connection._shared_reader.clear()
        server.stop()


def test_runs_group_by_prints_each_groups_mean_std_min_and_max_as_computed_by_hand(
    server: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", server.url)
    assert trainbus(["runs", "--group-by", "adapter.r", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["adapter.r"], row["metric"]) for row in rows] == [
        (r, metric) for r in ("8", "16") for metric in ("step", "loss", "eval_accuracy")
    ]
    for row in rows:
        mean, std, low, high = by_hand(int(row["adapter.r"]))[row["metric"]]  # type: ignore[misc]
        assert (row["runs"], row["n"]) == ("2", "2")
        assert float(row["mean"]) == pytest.approx(mean) and float(row["std"]) == pytest.approx(std)
        assert (float(row["min"]), float(row["max"])) == (pytest.approx(low), pytest.approx(high))


def test_the_compare_page_shows_the_same_group_table(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", server.url)
    reader = connection._shared_reader(server.url, None)
    wait_until(lambda: len(reader.overview().runs) == len(MEMBERS), what="the dashboard to read the runs")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.switch_page("views/compare.py")
    at.run()
    at.radio(key="compare-mode").set_value("Groups").run()
    at.selectbox(key="compare-group-key").set_value("adapter.r").run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "metric" in d.value.columns)
    assert table["adapter.r"].tolist() == ["8", "8", "8", "16", "16", "16"]
    for _, row in table.iterrows():
        mean, std, low, high = by_hand(int(row["adapter.r"]))[row["metric"]]  # type: ignore[misc]
        assert (row["mean"], row["std"], row["min"], row["max"]) == pytest.approx((mean, std, low, high))


def test_a_group_curve_is_the_mean_of_its_members_on_the_steps_they_share(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("NATS_URL", server.url)
    reader: BusReader = connection._shared_reader(server.url, None)
    wait_until(lambda: len(reader.overview().runs) == len(MEMBERS), what="the dashboard to read the runs")
    snaps = [snap for m in MEMBERS if (snap := reader.run(m.run_id)) is not None]
    chart = group_train_chart(groups_of(snaps, "adapter.r"), "loss", "minmax", shared=True)
    sixteen = chart.data[chart.data["group"] == "16"]
    assert sixteen["step"].tolist() == list(range(10, STEPS + 1, 10))  # g16-s2 logs every 10: 5, 15, … are not shared
    s1, s2 = MEMBERS[2], MEMBERS[3]
    for _, row in sixteen.iterrows():
        step = int(row["step"])
        pair = [s1.loss(step), s2.loss(step)]
        assert (row["mean"], row["low"], row["high"], row["n"]) == pytest.approx(
            (statistics.mean(pair), min(pair), max(pair), 2)
        )
    assert len(chart.data[chart.data["group"] == "8"]) == STEPS // 5
