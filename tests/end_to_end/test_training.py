"""The default tiny run, trained for real on the live bus: it learns, the stream tells all, and once
served it answers as a user asks (the text alone) and as the docs and the Try-it page say."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from consumers.predict.client import predict
from dashboards.app.views.tryit import EXAMPLES
from producers.task.data import Example, read_examples
from producers.task.labels import load_labels
from runtime.checkpoints import fingerprint
from schemas.predict import Answer
from tests.end_to_end.conftest import REPO, of_type, trainbus_env
from tests.end_to_end.test_predict import Process, cli

MAX_STEPS = 600
"""configs/tiny.yaml's: it evaluates and saves every 100 steps."""
EVALS = list(range(100, MAX_STEPS + 1, 100))


def test_default_run_exits_0_and_says_what_it_published(default_run: dict[str, Any]) -> None:
    assert default_run["code"] == 0, default_run["output"][-3000:]
    assert f"run {default_run['run_id']} (attempt 1) completed" in default_run["output"]


def test_default_run_output_off_a_terminal_is_json_lines_without_warnings(default_run: dict[str, Any]) -> None:
    lines = default_run["output"].splitlines()
    stray = [line for line in lines if not line.startswith(("{", "trainbus: "))]
    assert not stray, stray[:5]  # no progress bars, Python dicts of logs or library warnings
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [r for r in records if r["level"] in ("warning", "error")]
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(10, MAX_STEPS + 1, 10))
    assert [r["step"] for r in records if r["event"] == "evaluated"] == EVALS


def test_tiny_default_learns_the_classifier_within_its_steps(default_run: dict[str, Any]) -> None:
    events = default_run["events"]
    evals = of_type(events, "eval")
    final = evals[-1]
    started = of_type(events, "run.started")[0]
    assert final.step == started.max_steps == MAX_STEPS
    assert final.accuracy >= 0.9, [e.accuracy for e in evals]
    assert final.abstain_rate <= 0.15
    # and as serving is asked, with the text alone (trained for: data.metadata_dropout)
    assert final.text_only_accuracy is not None and final.text_only_accuracy >= 0.9, final
    assert final.text_only_abstain_rate is not None and final.text_only_abstain_rate <= 0.15


def test_stream_is_complete_and_in_order(default_run: dict[str, Any]) -> None:
    events = default_run["events"]
    trainer_events = [e for e in events if e.source == "trainer"]
    assert [e.seq for e in trainer_events] == list(range(1, len(trainer_events) + 1))
    assert all(e.event_id == f"default-run.1.{e.seq}" for e in trainer_events)
    assert trainer_events[0].type == "run.started" and trainer_events[-1].type == "run.finished"
    assert trainer_events[-1].status == "completed"
    started = trainer_events[0]
    assert started.world_size == 1 and started.adapter == "lora" and len(started.config_hash) == 64
    assert started.config["training"]["max_steps"] == MAX_STEPS and len(started.data_fingerprint) == 64
    assert 0 < started.trainable_parameters < started.total_parameters


def test_train_steps_carry_the_metrics_at_logging_cadence(default_run: dict[str, Any]) -> None:
    steps = of_type(default_run["events"], "train.step")
    assert [s.step for s in steps] == list(range(10, MAX_STEPS + 1, 10))
    for s in steps:
        assert s.loss > 0 and s.learning_rate > 0 and s.grad_norm is not None
        assert s.tokens_per_second > 0 and s.samples_per_second > 0 and s.step_time_seconds > 0
        assert s.memory_bytes > 10_000_000
        assert s.hyperparameters is not None and s.hyperparameters.learning_rate == 0.003
    assert steps[-1].loss < steps[0].loss / 5


def test_eval_events_carry_classification_metrics(default_run: dict[str, Any]) -> None:
    evals = of_type(default_run["events"], "eval")
    assert [e.step for e in evals] == EVALS
    final = evals[-1]
    assert final.labels == ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK"]
    assert set(final.per_label_f1) == set(final.labels)
    assert len(final.confusion_matrix) == 4 and all(len(row) == 4 for row in final.confusion_matrix)
    assert final.num_samples == 120 and 0 <= final.ece <= 1 and final.critical_error_cost >= 0
    assert final.num_abstained == round(final.abstain_rate * final.num_samples)
    assert final.macro_f1 >= 0.85


def test_checkpoint_events_match_the_files_on_disk(default_run: dict[str, Any]) -> None:
    checkpoints = of_type(default_run["events"], "checkpoint")
    assert [c.step for c in checkpoints] == EVALS
    for c in checkpoints:
        digest, size = fingerprint(Path(c.path))
        assert (digest, size) == (c.sha256, c.size_bytes)
        assert c.metrics["accuracy"] >= 0  # the metrics of the evaluation at that step
    assert checkpoints[-1].metrics["accuracy"] == of_type(default_run["events"], "eval")[-1].accuracy


def test_heartbeats_are_sent_while_training(default_run: dict[str, Any]) -> None:
    beats = of_type(default_run["events"], "heartbeat")
    assert len(beats) >= 5
    assert {b.phase for b in beats} <= {"training", "evaluating", "saving"}
    assert beats[-1].step > beats[0].step


def test_healthy_run_has_every_checkpoint_judged(default_run: dict[str, Any]) -> None:
    """The default run trained with the gate (shipped rules) watching: one verdict per checkpoint."""
    events, url, run = default_run["events"], default_run["url"], default_run["run_id"]
    checkpoints = of_type(events, "checkpoint")
    assert [c.step for c in checkpoints] == EVALS
    verdicts = of_type(events, "audit.verdict")
    assert sorted(v.checkpoint_event_id for v in verdicts) == sorted(c.event_id for c in checkpoints)
    flags = of_type(events, "audit.flag")
    assert not [f for f in flags if f.severity == "critical" and f.rule in ("non_finite", "loss_spike")]
    final = next(v for v in verdicts if v.checkpoint_step == MAX_STEPS)
    assert final.verdict == "approved", final.reasons
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "checkpoints", "--run", run, "--json"],
        cwd=REPO, env=trainbus_env(url), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["step"], r["verdict"]) for r in rows] == [
        (v.checkpoint_step, v.verdict) for v in sorted(verdicts, key=lambda v: v.checkpoint_step)
    ]


# ---- served: what a user asks, what the docs show --------------------------------------------

SERVED = "default-risk"
"""The alias the default run is served as here (the docs' `--alias risk` is test_predict.py's run)."""
DECISIONS = ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK", "abstain")


@pytest.fixture(scope="module")
def served_default(default_run: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`trainbus serve` on the default run: the audit gate's best approved checkpoint, as after `make demo`."""
    log = default_run["run_dir"].parent / "serve-default.log"
    serve = Process(default_run["url"], "serve", "--run", default_run["run_id"], "--alias", SERVED, log=log)
    try:
        line = serve.wait_for(f"serving run {default_run['run_id']} step")
        yield {**default_run, "step": int(line.split(" step ")[1].split()[0])}
    finally:
        assert serve.stop() == 0, log.read_text()[-2000:]


def _ask(url: str, batches: list[tuple[list[str], dict[str, Any]]]) -> list[list[Answer]]:
    async def go() -> list[list[Answer]]:
        nc = NATS()
        await nc.connect(url)
        try:
            return [await predict(nc, SERVED, texts, metadata=meta, rationale=False) for texts, meta in batches]
        finally:
            await nc.close()

    return asyncio.run(go())


def _figures(examples: list[Example], answers: dict[str, Answer]) -> tuple[float, float]:
    """(share answered, accuracy on the answered): an answered ambiguous text counts as wrong."""
    answered = [ex for ex in examples if answers[ex.text].decision is not None]
    right = [ex for ex in answered if answers[ex.text].decision == ex.label]
    return len(answered) / len(examples), len(right) / len(answered) if answered else 0.0


def test_the_served_default_answers_the_text_alone_as_well_as_with_its_metadata(
    served_default: dict[str, Any],
) -> None:
    """The held-out test texts over the bus: alone, as `trainbus predict "TEXT"` and the Try-it page
    send them, and with the metadata their rows have."""
    labels = load_labels(REPO / "configs/labels.yaml")
    examples = read_examples(served_default["data_dir"] / "test.jsonl", labels)[0]
    assert len(examples) == 120 and all(ex.metadata for ex in examples)
    [alone] = _ask(served_default["url"], [([ex.text for ex in examples], {})])
    channels = sorted({str(ex.metadata["channel"]) for ex in examples})
    groups = [[ex for ex in examples if ex.metadata["channel"] == channel] for channel in channels]
    with_metadata = _ask(served_default["url"], [([ex.text for ex in g], dict(g[0].metadata)) for g in groups])
    answered, accuracy = _figures(examples, {ex.text: a for ex, a in zip(examples, alone, strict=True)})
    full = {
        ex.text: a for group, got in zip(groups, with_metadata, strict=True) for ex, a in zip(group, got, strict=True)
    }
    answered_full, accuracy_full = _figures(examples, full)
    print(f"text alone: {answered:.1%} answered, accuracy {accuracy:.3f} on the answered; "
          f"with metadata: {answered_full:.1%} answered, accuracy {accuracy_full:.3f}")  # fmt: skip
    assert answered >= 0.9 and accuracy >= 0.9, (answered, accuracy)
    assert answered_full >= 0.95 and accuracy_full >= 0.99, (answered_full, accuracy_full)  # as before it learnt both
    assert {a.checkpoint.step for a in alone} == {served_default["step"]}


def _decisions(url: str, texts: list[str]) -> dict[str, str]:
    """What `trainbus predict --alias A "TEXT"…` answers, by text (abstain for an abstention)."""
    asked = cli(url, "predict", "--alias", SERVED, "--json", "--no-rationale", *texts)
    assert asked.returncode == 0, asked.stderr[-2000:]
    rows = [json.loads(line) for line in asked.stdout.splitlines()]
    return {row["text"]: row["decision"] or "abstain" for row in rows}


def test_the_try_it_examples_get_the_decisions_the_page_shows(served_default: dict[str, Any]) -> None:
    assert len(EXAMPLES) >= 3 and all(label in DECISIONS for _, label in EXAMPLES)
    assert _decisions(served_default["url"], [text for text, _ in EXAMPLES]) == dict(EXAMPLES)


def documented_examples(path: Path) -> list[tuple[str, str, str]]:
    """Every `trainbus predict --alias risk "TEXT"   # LABEL` line in a fenced block of ``path``:
    (``path:line``, text, label). A line that starts so but is not in that form fails here."""
    found, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced or not line.startswith("trainbus predict --alias ") or "#" not in line:
            continue
        command, label = (part.strip() for part in line.rsplit("#", 1))
        argv = shlex.split(command)
        where = f"{path.relative_to(REPO)}:{number}"
        assert len(argv) == 5 and argv[:3] == ["trainbus", "predict", "--alias"] and label in DECISIONS, (
            f'{where}: not `trainbus predict --alias risk "TEXT"   # LABEL` with LABEL one of {DECISIONS}: {line}'
        )
        found.append((where, argv[4], label))
    return found


def test_the_readme_and_docs_examples_get_the_decisions_they_show(served_default: dict[str, Any]) -> None:
    readme = documented_examples(REPO / "README.md")
    assert readme, 'README.md shows no `trainbus predict --alias risk "TEXT"   # LABEL` line in a fenced block'
    shown = readme + [found for page in sorted((REPO / "docs").glob("*.md")) for found in documented_examples(page)]
    answers = _decisions(served_default["url"], sorted({text for _, text, _ in shown}))
    wrong = [
        f"{where}: {text!r} is answered {answers[text]}, not {label}"
        for where, text, label in shown
        if answers[text] != label
    ]
    assert not wrong, wrong
