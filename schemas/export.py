"""JSON Schema of every event and command type, for consumers written in other languages.

Each schema says what its side of the wire may rely on:

- a command schema says what the trainer accepts (validation mode: ``type`` and the fields
  without a default are required, the others may be left out; unknown fields are refused);
- an event schema says what a reader receives (serialization mode: every field the writer always
  writes is required, null included where the type allows it). It leaves
  ``additionalProperties`` open, because a compatible change of the contract may add a field
  without raising ``schema_version`` and a reader must ignore fields it does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from schemas.commands import COMMAND_ADAPTER, COMMAND_TYPES, CommandReply
from schemas.events import EVENT_ADAPTER, EVENT_TYPES
from schemas.predict import PredictReply, PredictRequest

Mode = Literal["validation", "serialization"]


def _schema(target: type[BaseModel] | TypeAdapter[Any], title: str, mode: Mode) -> dict[str, Any]:
    raw = target.model_json_schema(mode=mode) if isinstance(target, type) else target.json_schema(mode=mode)
    schema: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **raw}
    schema["title"] = title
    return schema


def _open(node: Any) -> Any:
    """``node`` without ``additionalProperties: false`` anywhere (maps of values keep theirs)."""
    if isinstance(node, dict):
        return {k: _open(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(node, list):
        return [_open(v) for v in node]
    return node


def _event_schema(target: type[BaseModel] | TypeAdapter[Any], title: str) -> dict[str, Any]:
    return dict(_open(_schema(target, title, "serialization")))


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema: each event and command type, both unions, the predictor's request and reply."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in EVENT_TYPES.items():
        out[f"event.{name}.json"] = _event_schema(cls, name)
    for name, cmd in COMMAND_TYPES.items():
        out[f"command.{name}.json"] = _schema(cmd, name, "validation")
    out["event.json"] = _event_schema(EVENT_ADAPTER, "Event")
    out["command.json"] = _schema(COMMAND_ADAPTER, "Command", "validation")
    # the trainer writes the reply: what a client receives, like an event
    out["command-reply.json"] = _event_schema(CommandReply, "CommandReply")
    out["predict-request.json"] = _schema(PredictRequest, "PredictRequest", "validation")
    out["predict-reply.json"] = _event_schema(PredictReply, "PredictReply")
    return out
