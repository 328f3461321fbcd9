"""The contract: every event and command type, NaN round trips, bounds, exported JSON Schemas."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from schemas import (
    COMMAND_ADAPTER,
    EVENT_ADAPTER,
    EVENT_TYPES,
    Evaluation,
    TrainStep,
    check_run_id,
    control_subject,
    event_subject,
    parse_command,
    parse_event,
)
from schemas.commands import COMMAND_TYPES
from schemas.export import json_schemas

ENVELOPE = {"event_id": "r1.1.1", "run_id": "r1", "attempt": 1, "seq": 1}
HP = {"learning_rate": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.0, "logging_steps": 5}

SAMPLE_EVENTS: dict[str, dict[str, Any]] = {
    "run.started": {
        "config": {"training": {"max_steps": 10}},
        "config_hash": "abc",
        "model": "tiny",
        "adapter": "lora",
        "data_fingerprint": "f" * 64,
        "world_size": 2,
        "hyperparameters": HP,
    },
    "run.state": {"state": "paused", "step": 3, "reason": "operator"},
    "run.finished": {"status": "failed", "step": 7, "reason": "error", "error": "RuntimeError: boom"},
    "train.step": {"step": 4, "epoch": 0.5, "loss": math.nan, "learning_rate": 1e-3, "grad_norm": math.inf},
    "eval": {
        "step": 5,
        "loss": 0.4,
        "accuracy": 0.9,
        "macro_f1": 0.88,
        "per_label_f1": {"HIGH_RISK": 1.0},
        "abstain_rate": 0.05,
        "ece": 0.02,
        "critical_error_cost": 1.5,
        "labels": ["HIGH_RISK", "NO_RISK"],
        "confusion_matrix": [[3, 0], [1, 4]],
        "num_samples": 8,
    },
    "checkpoint": {"step": 5, "path": "runs/r1/checkpoint-5", "sha256": "a" * 64, "size_bytes": 1234},
    "command.result": {"command_id": "c1", "command": "pause", "status": "applied", "step": 6},
    "audit.flag": {
        "rule": "non_finite_loss",
        "severity": "critical",
        "message": "loss is NaN",
        "judged_event_id": "r1.1.4",
        "value": math.nan,
    },
    "audit.verdict": {
        "checkpoint_event_id": "r1.1.9",
        "checkpoint_step": 5,
        "checkpoint_path": "runs/r1/checkpoint-5",
        "verdict": "rejected",
        "reasons": ["loss is NaN"],
    },
    "heartbeat": {"step": 2, "phase": "training", "uptime_seconds": 3.5},
    "predictor.loaded": {
        "alias": "risk",
        "subject": "trainbus.predict.risk",
        "step": 5,
        "checkpoint_path": "runs/r1/checkpoint-5",
        "sha256": "a" * 64,
        "verdict": "approved",
        "instance": "abc",
    },
    "run.tag": {"tags": {"team": "risk", "dataset": "v2"}, "source": "user", "issued_by": "ana"},
    "run.note": {"text": "lr 3e-3 diverged at step 40; retrying with 1e-3", "source": "user"},
    "job.state": {
        "job_id": "j-3f2a9c1d0e",
        "state": "starting",
        "agent": "gpu-host-1",
        "gpus": [0],
        "source": "launch",
    },
}


def sample(event_type: str) -> Any:
    return EVENT_TYPES[event_type](**ENVELOPE, **SAMPLE_EVENTS[event_type])


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLE_EVENTS) == set(EVENT_TYPES)
    assert {"run.started", "run.state", "run.finished", "train.step", "eval", "checkpoint"} <= set(EVENT_TYPES)
    assert {"command.result", "audit.flag", "audit.verdict", "heartbeat"} <= set(EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(SAMPLE_EVENTS))
def test_events_round_trip_through_json_with_the_union(event_type: str) -> None:
    event = sample(event_type)
    parsed = parse_event(event.model_dump_json())
    assert type(parsed) is type(event)
    assert parsed.model_dump_json() == event.model_dump_json()


def test_nan_and_infinity_survive_as_standard_json_strings() -> None:
    event = TrainStep(**ENVELOPE, step=1, epoch=0, loss=math.nan, learning_rate=1e-3, grad_norm=-math.inf)
    text = event.model_dump_json()
    plain = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert plain["loss"] == "NaN" and plain["grad_norm"] == "-Infinity"
    back = parse_event(text)
    assert isinstance(back, TrainStep) and math.isnan(back.loss) and back.grad_norm == -math.inf


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "x" * 65, "run/1", "*", ">"])
def test_bad_run_ids_are_rejected_everywhere(bad: str) -> None:
    with pytest.raises(ValueError):
        check_run_id(bad)
    with pytest.raises(ValidationError):
        TrainStep(**{**ENVELOPE, "run_id": bad}, step=1, epoch=0, loss=1, learning_rate=1)


def test_subjects() -> None:
    assert event_subject("run-1", "train.step") == "trainbus.events.run-1.train.step"
    assert control_subject("run_1") == "trainbus.control.run_1"
    with pytest.raises(ValueError, match="invalid run id"):
        control_subject("a.b")


def test_unknown_fields_and_types_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TrainStep(**ENVELOPE, step=1, epoch=0, loss=1, learning_rate=1, surprise=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        parse_event(json.dumps({**ENVELOPE, "type": "train.teleport"}))


def cmd(**fields: Any) -> str:
    return json.dumps({"command_id": "c1", "run_id": "r1", "issued_by": "alice", **fields})


@pytest.mark.parametrize(
    "payload",
    [
        cmd(type="set", learning_rate=-1e-3),
        cmd(type="set", learning_rate=0),
        cmd(type="set", learning_rate="NaN"),
        cmd(type="set", learning_rate="Infinity"),
        cmd(type="set", max_grad_norm=0),
        cmd(type="set", eval_steps=0),
        cmd(type="set"),
        cmd(type="set", learning_rate=1e-3, momentum=0.9),
        cmd(type="pause", extra=1),
        cmd(type="launch"),
        '{"type": "pause"}',
        "not json",
    ],
)
def test_out_of_range_and_malformed_commands_are_rejected_by_the_schema(payload: str) -> None:
    with pytest.raises(ValidationError):
        parse_command(payload)


def test_valid_commands_parse() -> None:
    command = parse_command(cmd(type="set", learning_rate=1e-5, max_grad_norm=0.5))
    assert command.type == "set" and command.changes() == {"learning_rate": 1e-5, "max_grad_norm": 0.5}  # type: ignore[union-attr]
    assert parse_command(cmd(type="stop")).save is True  # type: ignore[union-attr]
    assert set(COMMAND_TYPES) == {"pause", "resume", "stop", "save_checkpoint", "evaluate", "set"}


def test_exported_schemas_validate_samples_with_jsonschema(tmp_path: Path) -> None:
    """The exported files (not pydantic) accept every sample and reject bad ones."""
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "schema", "export", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    files = {p.name for p in tmp_path.iterdir()}
    assert files == set(json_schemas())
    union = json.loads((tmp_path / "event.json").read_text())
    for event_type in SAMPLE_EVENTS:
        instance = json.loads(sample(event_type).model_dump_json())
        per_type = json.loads((tmp_path / f"event.{event_type}.json").read_text())
        jsonschema.validate(instance, per_type)
        jsonschema.validate(instance, union)
    nan_step = json.loads(sample("train.step").model_dump_json())
    assert nan_step["loss"] == "NaN"  # valid per schema because the schema allows the strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**nan_step, "loss": "banana"}, union)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**nan_step, "run_id": "a.b"}, union)
    commands = json.loads((tmp_path / "command.json").read_text())
    jsonschema.validate(json.loads(cmd(type="set", learning_rate=1e-4)), commands)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(cmd(type="set", learning_rate=-1)), commands)


def test_eval_event_carries_the_classification_metrics() -> None:
    fields = set(Evaluation.model_fields)
    assert {
        "loss",
        "accuracy",
        "macro_f1",
        "per_label_f1",
        "abstain_rate",
        "ece",
        "critical_error_cost",
        "confusion_matrix",
    } <= fields


def test_adapters_parse_python_objects_too() -> None:
    assert (
        EVENT_ADAPTER.validate_python({**ENVELOPE, **SAMPLE_EVENTS["heartbeat"], "type": "heartbeat"}).type
        == "heartbeat"
    )
    assert COMMAND_ADAPTER.validate_python(json.loads(cmd(type="resume"))).type == "resume"
