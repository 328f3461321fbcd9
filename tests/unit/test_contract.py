"""The contract as a client in another language sees it: exported schemas, required fields,
tolerant reading of unknown fields, and events of a newer schema_version skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from producers.run.control_inbox import ControlChannel
from runtime.bus.stream import Delivered, NewerEvents
from runtime.cli.main import main
from schemas import SCHEMA_VERSION, CommandReply, NewerSchema, RunStarted, parse_command, parse_event
from schemas.commands import COMMAND_TYPES
from schemas.events import EVENT_TYPES
from schemas.predict import PredictReply, PredictRequest
from tests.schema_client import required_payload, string_for


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """What `trainbus schema export` writes, read back from the files."""
    out = tmp_path_factory.mktemp("schemas")
    assert main(["schema", "export", str(out)]) == 0
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(out).iterdir())}


def members(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas of a file: itself, or each member of a union."""
    if "oneOf" not in schema:
        return [schema]
    return [schema["$defs"][ref["$ref"].split("/")[-1]] for ref in schema["oneOf"]]


def test_every_type_has_its_schema_file(exported: dict[str, dict[str, Any]]) -> None:
    expected = {f"event.{t}.json" for t in EVENT_TYPES} | {f"command.{t}.json" for t in COMMAND_TYPES}
    assert set(exported) == expected | {
        "event.json",
        "command.json",
        "command-reply.json",
        "predict-request.json",
        "predict-reply.json",
    }


def test_every_command_and_event_schema_requires_its_type(exported: dict[str, dict[str, Any]]) -> None:
    for name, schema in exported.items():
        if name.startswith(("event", "command.")):
            for member in members(schema):
                assert "type" in member["required"], f"{name}: {member['title']} does not require type"


def test_event_schemas_require_every_field_the_writer_always_writes(exported: dict[str, dict[str, Any]]) -> None:
    for event_type, cls in EVENT_TYPES.items():
        schema = exported[f"event.{event_type}.json"]
        assert set(schema["required"]) == set(cls.model_fields), event_type
    hyperparameters = exported["event.run.started.json"]["$defs"]["Hyperparameters"]
    assert set(hyperparameters["required"]) >= {"learning_rate", "max_grad_norm", "logging_steps"}
    # a reader must not refuse a field a later, compatible release adds
    assert "additionalProperties" not in exported["event.train.step.json"]


def test_command_schemas_require_only_what_the_trainer_needs(exported: dict[str, dict[str, Any]]) -> None:
    pause = exported["command.pause.json"]
    assert set(pause["required"]) == {"type", "command_id", "run_id", "issued_by"}
    assert pause["additionalProperties"] is False  # the trainer refuses unknown fields


@pytest.mark.parametrize("pattern", [r"^[A-Za-z0-9_-]{1,64}$", r"^[a-z][a-z0-9_-]{0,31}$", r"^[0-9a-f]{64}$"])
def test_the_schema_client_builds_strings_its_patterns_accept(pattern: str) -> None:
    assert jsonschema.Draft202012Validator({"type": "string", "pattern": pattern}).is_valid(string_for(pattern))


def parser_for(name: str) -> Any:
    if name.startswith("event"):
        return parse_event
    if name.startswith("command."):
        return parse_command
    if name.startswith("predict-"):
        model = PredictRequest if name == "predict-request.json" else PredictReply
        return model.model_validate_json
    return CommandReply.model_validate_json


def test_a_payload_of_required_fields_alone_is_valid_and_parsed_for_every_schema(
    exported: dict[str, dict[str, Any]],
) -> None:
    for name, schema in exported.items():
        payload = required_payload(schema)
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(payload)
        parsed = parser_for(name)(json.dumps(payload))
        if name.startswith(("event.", "command.")) and name.count(".") > 1:
            assert parsed.type == name.split(".", 1)[1].removesuffix(".json"), name


def test_the_trainer_takes_every_required_fields_only_command_without_calling_it_invalid(
    exported: dict[str, dict[str, Any]],
) -> None:
    channel = ControlChannel("A")  # the run id the schema client builds from the pattern
    for command_type in ["resume", *sorted(set(COMMAND_TYPES) - {"resume", "stop"}), "stop"]:
        payload = required_payload(exported[f"command.{command_type}.json"])
        payload["command_id"] = f"contract-{command_type}"
        reply = CommandReply.model_validate_json(channel.handle(json.dumps(payload).encode()))
        assert reply.code != "invalid", (command_type, reply)
        assert reply.status == "accepted" or (reply.code and reply.message), (command_type, reply)


def with_extras(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as a later compatible release might write it: new fields, also nested."""
    out = {**payload, "added_later": {"anything": [1, 2]}}
    if isinstance(out.get("hyperparameters"), dict):
        out["hyperparameters"] = {**out["hyperparameters"], "new_knob": 3}
    return out


def test_readers_ignore_fields_they_do_not_know(exported: dict[str, dict[str, Any]]) -> None:
    for event_type in EVENT_TYPES:
        payload = with_extras(required_payload(exported[f"event.{event_type}.json"]))
        event = parse_event(json.dumps(payload))
        assert event.type == event_type and "added_later" not in event.model_dump()
    # writers stay strict: the same field refused when an event is built
    started = required_payload(exported["event.run.started.json"])
    with pytest.raises(ValueError, match="added_later"):
        RunStarted.model_validate(with_extras(started))


class Lines:
    """A structlog-shaped logger that keeps its warnings (what `NewerEvents` reports)."""

    def __init__(self) -> None:
        self.warnings: list[dict[str, Any]] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.warnings.append({"message": message, **fields})


def test_an_event_of_a_newer_schema_version_is_skipped_and_reported_once_per_run(
    exported: dict[str, dict[str, Any]],
) -> None:
    beat = required_payload(exported["event.heartbeat.json"])
    newer = {**beat, "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(NewerSchema):
        parse_event(json.dumps(newer))
    with pytest.raises(NewerSchema):  # even when its fields no longer parse at all
        parse_event(json.dumps({"type": "heartbeat", "schema_version": SCHEMA_VERSION + 1, "beat": "renamed"}))
    log = Lines()
    report = NewerEvents(log)
    for run_id in ("r1", "r1", "r2", "r1"):
        report.skip(Delivered(1, f"trainbus.events.{run_id}.heartbeat", None, None, b"", newer=SCHEMA_VERSION + 1))
    assert report.skipped == 4
    assert [w["run_id"] for w in log.warnings] == ["r1", "r2"]
    assert log.warnings[0]["schema_version"] == SCHEMA_VERSION + 1 and "upgrade" in log.warnings[0]["message"]
