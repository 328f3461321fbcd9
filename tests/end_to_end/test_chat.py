"""Chat fine-tuning (configs/tiny-chat.yaml) trained for real with the audit gate and the exporter
watching, unchanged: eval events carry loss and perplexity, every checkpoint gets its verdict, the
exporter shows the run, and `events`/`checkpoints` read it."""

from __future__ import annotations

import math
import select
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.bus.server import RunningServer
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, of_type, start_trainer, trainbus_env, wait_events

RUN = "chat-run"


def metric(url: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture(scope="module")
def chat_run(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("chat")
    env = trainbus_env(nats_server.url)
    consumers = [
        subprocess.Popen([sys.executable, "-m", "runtime.cli", "audit", "--run", RUN], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=(tmp / "audit.log").open("w"), text=True),
        subprocess.Popen([sys.executable, "-m", "runtime.cli", "exporter", "--port", "0"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=(tmp / "exporter.log").open("w"), text=True),
    ]  # fmt: skip
    try:
        lines = []
        for proc in consumers:
            assert proc.stdout is not None and select.select([proc.stdout], [], [], 60)[0], "a consumer said nothing"
            lines.append(proc.stdout.readline())
        assert lines[0].startswith("trainbus audit: watching"), lines
        trainer = start_trainer(
            nats_server.url, "configs/tiny-chat.yaml", RUN, tmp,
            "training.max_steps=40", "training.eval_steps=20", "training.save_steps=20",
        )  # fmt: skip
        code = trainer.wait(300)
        events = wait_events(
            nats_server.url, RUN, lambda ev: len(of_type(ev, "audit.verdict")) >= len(of_type(ev, "checkpoint")) > 0
        )
        yield {"code": code, "output": trainer.output(), "events": events, "metrics": lines[1].split()[-1]}
    finally:
        for proc in consumers:
            proc.terminate()
            proc.wait(20)


def test_chat_run_learns_and_its_evals_carry_loss_and_perplexity(chat_run: dict[str, Any]) -> None:
    assert chat_run["code"] == 0, chat_run["output"][-3000:]
    events = chat_run["events"]
    assert of_type(events, "run.started")[0].config["data"]["task"] == "chat"
    evals = of_type(events, "eval")
    assert [e.step for e in evals] == [20, 40]
    for e in evals:
        assert e.perplexity == pytest.approx(math.exp(e.loss))
        assert e.accuracy is None and e.labels == []
    first_loss = of_type(events, "train.step")[0].loss
    assert evals[-1].loss < first_loss / 2, (first_loss, [e.loss for e in evals])


def test_the_audit_gate_judges_every_chat_checkpoint(chat_run: dict[str, Any]) -> None:
    verdicts = of_type(chat_run["events"], "audit.verdict")
    assert sorted((v.checkpoint_step, v.verdict) for v in verdicts) == [(20, "approved"), (40, "approved")]
    assert not [f for f in of_type(chat_run["events"], "audit.flag") if f.severity == "critical"]


def test_the_exporter_shows_the_chat_run(chat_run: dict[str, Any]) -> None:
    url = chat_run["metrics"]
    final = of_type(chat_run["events"], "eval")[-1]
    wait_until(lambda: metric(url, "trainbus_eval_loss", run_id=RUN) == pytest.approx(final.loss), what="the eval loss")
    assert metric(url, "trainbus_checkpoints", run_id=RUN, verdict="approved") == 2
    assert metric(url, "trainbus_run_state", run_id=RUN, state="completed") == 1


def test_events_and_checkpoints_read_the_chat_run(nats_server: RunningServer, chat_run: dict[str, Any]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, env=trainbus_env(nats_server.url),
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    events = cli("events", "--run", RUN, "--type", "eval")
    assert events.returncode == 0, events.stderr
    assert "perplexity=" in events.stdout and "accuracy=" not in events.stdout
    checkpoints = cli("checkpoints", "--run", RUN)
    assert checkpoints.returncode == 0, checkpoints.stderr
    assert [line.split()[:4] for line in checkpoints.stdout.splitlines()[1:]] == [
        ["20", "1", "scheduled", "approved"],
        ["40", "1", "scheduled", "approved"],
    ]
