"""A real Prometheus scrapes `trainbus exporter` while a tiny run with no command and no audit gate trains;
every dashboard query returns data and every alert evaluates. A fresh Prometheus over an exporter
full of short finished runs (rejected checkpoints, critical flags, a diverged loss) pages about none
of them, only about the live run with a problem.

Also runs the promtool checks of the alert rules and the scrape config. Prometheus and promtool come
from Debian's ``prometheus`` package (.ci/apt-packages): skipped locally without them, required in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream
from runtime.publish.sinks import MemorySink, Stamper
from runtime.settings import ServerSettings, StreamSettings
from schemas import AuditFlag, AuditVerdict, Checkpoint, RunFinished, RunStarted, TrainStep
from tests.conftest import require_tool, wait_until

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards/grafana/trainbus.json"
ALERTS = REPO / "dashboards/prometheus/alerts.yml"
PROVISIONING = REPO / "dashboards/grafana/provisioning"


def dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL ``expr`` of every panel target, rows included."""
    found: list[str] = []
    if isinstance(node, dict):
        for target in node.get("targets", []):
            if target.get("expr"):
                found.append(target["expr"])
        for child in node.get("panels", []):
            found += dashboard_exprs(child)
    elif isinstance(node, list):
        for child in node:
            found += dashboard_exprs(child)
    return found


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- static checks (always run) -------------------------------------------------------------


def test_dashboard_has_a_run_picker_and_the_panels_the_issue_names() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "label_values(trainbus_run_state, run_id)" in variables["run_id"]["definition"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in (
        "loss",
        "learning rate",
        "gradient norm",
        "throughput",
        "memory",
        "accuracy",
        "audit",
        "checkpoint",
        "command",
    ):
        assert word in titles, word
    exprs = dashboard_exprs(dash)
    assert exprs and all("trainbus_" in e for e in exprs)
    per_run = [e for e in exprs if "trainbus_exporter_" not in e]
    assert all('run_id=~"$run_id"' in e for e in per_run)


def test_grafana_provisioning_loads_the_dashboard_and_a_prometheus_data_source() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING / "dashboards/trainbus.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]


# ---- promtool ---------------------------------------------------------------------------------


def test_promtool_rule_unit_tests_pass_and_cover_every_alert() -> None:
    promtool = require_tool("promtool")
    tests = (REPO / "tests/promtool/alerts_test.yml").read_text()
    assert all(f"alertname: {name}" in tests for name in alert_exprs())
    out = subprocess.run(
        [promtool, "test", "rules", "tests/promtool/alerts_test.yml"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    promtool = require_tool("promtool")
    out = subprocess.run(
        [promtool, "check", "config", "dashboards/prometheus/prometheus.yml"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- a real Prometheus while a run trains --------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` response; an error answer is returned, not raised."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as exc:
            return dict(json.load(exc))

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return list(answer["data"]["result"])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    procs: list[subprocess.Popen[Any]] = []
    yield procs
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_every_dashboard_query_and_alert_evaluates_on_a_real_run(
    nats_server: RunningServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[Any]],
) -> None:
    prometheus = require_tool("prometheus")
    run = f"prom-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"OMP_NUM_THREADS": "1"}
    env["NATS_URL"] = nats_server.url

    prom = _start_prometheus(prometheus, _start_exporter(env, tmp_path, processes), tmp_path, processes)

    argv = [
        sys.executable,
        "-m",
        "runtime.cli.main",
        "train",
        "configs/tiny.yaml",
        "--run-id",
        run,
        "--set",
        "data.max_eval_samples=16",
    ]
    for override in ("max_steps=40", "eval_steps=20", "save_steps=20", f"output_dir={tmp_path / 'runs'}"):
        argv += ["--set", f"training.{override}"]
    train = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "train.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    processes.append(train)

    # A healthy run: no command is sent and no audit gate runs, yet every panel has data, because
    # the series whose label values are known in advance exist at 0 from the run's first event.
    wait_until(lambda: _ready(prom), timeout=30, what="Prometheus to start")
    assert train.wait(240) == 0, (tmp_path / "train.log").read_text()[-3000:]
    wait_until(
        lambda: prom.series(f'trainbus_run_state{{run_id="{run}",state="completed"}} == 1'),
        timeout=20,
        what="Prometheus to scrape the finished run",
    )

    empty = []
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        query = expr.replace("$run_id", run).replace("$__rate_interval", "1m").replace("$__interval", "1m")
        if not prom.series(query):
            empty.append(query)
    assert not empty, f"dashboard queries without data for {run}: {empty}"
    assert {s["metric"]["run_id"] for s in prom.series("group by (run_id) (trainbus_run_state)")} >= {run}
    assert prom.series(f'trainbus_run_state{{run_id="{run}",state="stalled"}} == 0')
    assert prom.series(f'trainbus_commands_total{{run_id="{run}",command="pause",result="applied"}} == 0')
    assert prom.series(f'trainbus_audit_flags_total{{run_id="{run}",rule="non_finite",severity="critical"}} == 0')

    for name, expr in alert_exprs().items():
        assert prom.query(expr)["status"] == "success", name
    rules = wait_until(lambda: _rules(prom), timeout=10, what="the alert rules to be evaluated")
    assert {r["name"] for r in rules} == set(alert_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def _finished_runs(url: str, now: datetime) -> None:
    """Short runs that ended half an hour ago with everything that used to page, and one live diverged run."""
    hp = {"learning_rate": 1e-3}
    sink = MemorySink()  # every event, in the order the runs published them
    for n, run_id in enumerate(("short-a", "short-b", "short-c")):
        t = now - timedelta(minutes=35 - n)
        stamper = Stamper(sink, run_id)
        stamper.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
                     hyperparameters=hp, time=t)  # fmt: skip
        stamper.emit(TrainStep, step=20, epoch=0.1, loss=float("nan") if n == 2 else 2.0, learning_rate=1e-3, time=t)
        for step in (20, 40):
            ckpt = stamper.emit(Checkpoint, step=step, path=f"/r/checkpoint-{step}", sha256="a" * 64,
                                size_bytes=1, time=t)  # fmt: skip
            sink.publish(AuditVerdict(
                event_id=f"{run_id}.audit.verdict.{ckpt.event_id}", run_id=run_id, seq=step // 20, source="audit",
                checkpoint_event_id=ckpt.event_id, checkpoint_step=step, checkpoint_path=ckpt.path,
                verdict="rejected", reasons=["accuracy_floor (warning): accuracy was 0.2 at step 20"], time=t,
            ))  # fmt: skip
        sink.publish(AuditFlag(
            event_id=f"{run_id}.audit.loss_spike.x", run_id=run_id, seq=3, source="audit", rule="loss_spike",
            severity="critical", step=20, message="loss rose", judged_event_id="x", time=t,
        ))  # fmt: skip
        stamper.emit(RunFinished, status="failed" if n == 2 else "completed", step=40, time=t)
    live = Stamper(sink, "live-nan")
    live.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
              hyperparameters=hp)  # fmt: skip
    live.emit(TrainStep, step=5, epoch=0.1, loss=float("nan"), learning_rate=1e-3)

    async def publish() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_stream(js, StreamSettings())
        for event in sink.events:
            subject = f"trainbus.events.{event.run_id}.{event.type}"
            await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})
        await nc.close()

    asyncio.run(publish())


@pytest.mark.slow
def test_a_fresh_prometheus_pages_about_no_finished_run_only_the_live_problem(
    tmp_path: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    prometheus = require_tool("prometheus")
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    try:
        _finished_runs(server.url, datetime.now(UTC))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"NATS_URL": server.url}
        # the live run sends no heartbeat: it must not turn stalled however slowly this machine goes
        exporter = _start_exporter(env, tmp_path, processes, "--stall-after", "3600")
        prom = _start_prometheus(prometheus, exporter, tmp_path, processes)
        wait_until(lambda: _ready(prom), timeout=30, what="Prometheus to start")
        # what used to page is there: rejected checkpoints, critical flags, a NaN loss of a failed run
        wait_until(lambda: prom.series('trainbus_checkpoints{run_id="short-a",verdict="rejected"} == 2'), timeout=30,
                   what="Prometheus to scrape the finished runs")  # fmt: skip
        assert prom.series('trainbus_audit_flags_total{run_id="short-b",severity="critical"} == 1')
        assert prom.series('trainbus_train_loss{run_id="short-c"} != trainbus_train_loss{run_id="short-c"}')
        # ten evaluations of every rule after that scrape
        done = _evaluations(prom) + 10
        wait_until(lambda: _evaluations(prom) >= done, timeout=60, what="ten more rule evaluations")
        alerts = [(a["labels"]["alertname"], a["labels"].get("run_id")) for a in _alerts(prom)]
        assert alerts == [("TrainbusNonFiniteLoss", "live-nan")]
    finally:
        server.stop()


def _start_exporter(env: dict[str, str], tmp_path: Path, processes: list[subprocess.Popen[Any]], *args: str) -> str:
    """`trainbus exporter --port 0 ARGS`; returns the host:port it serves on."""
    exporter = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "exporter", "--port", "0", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=(tmp_path / "exporter.log").open("w"), text=True,
    )  # fmt: skip
    processes.append(exporter)
    assert exporter.stdout is not None and select.select([exporter.stdout], [], [], 30)[0], "exporter gave no URL"
    return urllib.parse.urlparse(exporter.stdout.readline().split()[-1]).netloc


def _start_prometheus(binary: str, target: str, tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> Prometheus:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{"job_name": "trainbus", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    processes.append(
        subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
        )
    )
    return Prometheus(f"http://127.0.0.1:{port}")


def _evaluations(prom: Prometheus) -> float:
    """How often Prometheus has evaluated the trainbus rule group (from its own /metrics)."""
    with urllib.request.urlopen(f"{prom.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prometheus_rule_group_iterations_total" and sample.labels["rule_group"].endswith(";trainbus")
    )


def _alerts(prom: Prometheus) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{prom.url}/api/v1/alerts", timeout=10) as response:
        return list(json.load(response)["data"]["alerts"])


def _rules(prom: Prometheus) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return rules if rules and all(r["health"] != "unknown" for r in rules) else []


def _ready(prom: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
