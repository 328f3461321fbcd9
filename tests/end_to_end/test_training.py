"""The default tiny run, trained for real on the live bus: it learns, and the stream tells all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from runtime.checkpoints import fingerprint
from tests.end_to_end.conftest import REPO, of_type, trainbus_env

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
