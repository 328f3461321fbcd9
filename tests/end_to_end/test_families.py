"""Run families on the shared default run: a fork from its checkpoint at step 200 with another
learning rate goes on from that checkpoint's weights, a fork of that fork, a fork of a rejected
checkpoint refused; the lineage in `trainbus runs` and on the dashboard's Run pages."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from streamlit.testing.v1 import AppTest

from dashboards.app import connection
from runtime.publish.direct import event_id, publish_event
from schemas import AuditVerdict, Checkpoint, RunStarted, TrainStep
from tests.conftest import REPO, wait_until
from tests.end_to_end.conftest import events_of, trainbus_env

pytestmark = pytest.mark.slow
MAIN = str(REPO / "dashboards/app/main.py")
FORK = "fork-lr"
GRANDCHILD = "fork-of-fork"


def trainbus(url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, env=trainbus_env(url),
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def verdict_at(events: list[Any], step: int) -> str | None:
    checkpoint = next(e for e in events if isinstance(e, Checkpoint) and e.step == step)
    found = [e.verdict for e in events if isinstance(e, AuditVerdict) and e.checkpoint_event_id == checkpoint.event_id]
    return found[-1] if found else None


@pytest.fixture(scope="module")
def forked(default_run: dict[str, Any]) -> dict[str, Any]:
    """A fork of the default run at step 200 (rejected by the audit gate or not: --force says fork it
    anyway) with a third of its learning rate, for 20 steps; then a fork of that fork."""
    url, parent = default_run["url"], default_run["events"]
    force = ["--force"] if verdict_at(parent, 200) == "rejected" else []
    child = trainbus(url, "train", "--fork", "default-run@200", *force, "--run-id", FORK, "--set", "training.learning_rate=1e-3",
                     "--set", "training.max_steps=220", "--set", "training.logging_steps=5", "--set", "training.save_steps=10")  # fmt: skip
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-2000:]
    grandchild = trainbus(
        url, "train", "--fork", f"{FORK}@210", "--run-id", GRANDCHILD, "--set", "training.max_steps=215"
    )
    assert grandchild.returncode == 0, grandchild.stdout[-2000:] + grandchild.stderr[-2000:]
    return {"url": url, "parent": parent, "child": events_of(url, FORK), "grandchild": events_of(url, GRANDCHILD)}


def test_a_fork_goes_on_from_the_parents_checkpoint_with_its_own_learning_rate(forked: dict[str, Any]) -> None:
    started = next(e for e in forked["child"] if isinstance(e, RunStarted))
    checkpoint = next(e for e in forked["parent"] if isinstance(e, Checkpoint) and e.step == 200)
    assert started.fork is not None
    assert (started.fork.parent, started.fork.step, started.fork.sha256) == ("default-run", 200, checkpoint.sha256)
    assert started.fork.changed["training.learning_rate"] == {"from": 0.003, "to": 0.001}
    assert started.fork.changed["training.max_steps"] == {"from": 600, "to": 220}
    assert started.resumed_from_step == 200 and started.hyperparameters.learning_rate == pytest.approx(1e-3)
    steps = [e for e in forked["child"] if isinstance(e, TrainStep)]
    parent_steps = {e.step: e for e in forked["parent"] if isinstance(e, TrainStep)}
    assert steps[0].step == 205  # its steps count on from the parent's
    # the same weights go on: its first loss is where the parent's was at 200, not an untrained model's
    at_200, untrained = parent_steps[200].loss, parent_steps[min(parent_steps)].loss
    assert abs(steps[0].loss - at_200) < 0.25 * (untrained - at_200), (steps[0].loss, at_200, untrained)
    assert all(e.hyperparameters is None or e.hyperparameters.learning_rate == pytest.approx(1e-3) for e in steps)


def test_a_fork_of_a_fork_names_its_own_parent(forked: dict[str, Any]) -> None:
    started = next(e for e in forked["grandchild"] if isinstance(e, RunStarted))
    assert started.fork is not None and (started.fork.parent, started.fork.step) == (FORK, 210)
    assert started.fork.changed == {"training.max_steps": {"from": 220, "to": 215}}
    assert started.hyperparameters.learning_rate == pytest.approx(1e-3)  # its parent's, which it inherited
    runs = {r["run_id"]: r for r in map(json.loads, trainbus(forked["url"], "runs", "--json").stdout.splitlines())}
    assert (runs[FORK]["parent"], runs[GRANDCHILD]["parent"]) == ("default-run@200", f"{FORK}@210")
    assert "parent" not in runs["default-run"]


def test_a_fork_of_a_rejected_checkpoint_is_refused_unless_forced(forked: dict[str, Any]) -> None:
    url = forked["url"]
    checkpoint = next(e for e in forked["child"] if isinstance(e, Checkpoint) and e.step == 220)

    async def reject() -> None:  # what the audit gate publishes for a checkpoint it rejects
        nc = NATS()
        await nc.connect(url)
        verdict = AuditVerdict(
            event_id=event_id(FORK, "audit", "verdict", checkpoint.event_id), run_id=FORK, seq=1, source="audit",
            checkpoint_event_id=checkpoint.event_id, checkpoint_step=220, checkpoint_path=checkpoint.path,
            verdict="rejected", reasons=["accuracy 0.20 < 0.90"],
        )  # fmt: skip
        await publish_event(nc.jetstream(), verdict)
        await nc.close()

    asyncio.run(reject())
    refused = trainbus(url, "train", "--fork", f"{FORK}@220", "--run-id", "never-started")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"trainbus train: --fork {FORK}@220: the audit gate rejected checkpoint-220 of {FORK} "
        "(accuracy 0.20 < 0.90); --force forks it anyway"
    ]
    assert not events_of(url, "never-started")


def test_the_run_pages_show_the_lineage(forked: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", forked["url"])
    reader = connection._shared_reader(forked["url"], None)
    wait_until(lambda: reader.run(GRANDCHILD) is not None, what="the dashboard to read the forks")

    def page(run: str) -> list[str]:
        at = AppTest.from_file(MAIN, default_timeout=60)
        at.switch_page("views/run.py")
        at.query_params["run"] = run
        at.run()
        assert not at.exception, at.exception
        return [m.value for m in at.markdown]

    child = page(FORK)
    assert any(line.startswith("Forked from [default-run](run?run=default-run) at step 200 · changed ") and "training.learning_rate 0.003 → 0.001" in line for line in child), child  # fmt: skip
    assert any(f"[{GRANDCHILD}](run?run={GRANDCHILD}) at step 210" in line for line in child), child
    assert any(f"[{FORK}](run?run={FORK}) at step 200" in line for line in page("default-run"))
    connection._shared_reader.clear()
