"""JSON Schema of every event and command type, for consumers written in other languages."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.commands import COMMAND_ADAPTER, COMMAND_TYPES, CommandReply
from schemas.events import EVENT_ADAPTER, EVENT_TYPES
from schemas.predict import PredictReply, PredictRequest


def _schema(target: type[BaseModel] | TypeAdapter[Any], title: str) -> dict[str, Any]:
    raw = (
        target.model_json_schema(mode="serialization")
        if isinstance(target, type)
        else (target.json_schema(mode="serialization"))
    )
    schema: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **raw}
    schema["title"] = title
    return schema


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema: each event and command type, both unions, the predictor's request and reply."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in EVENT_TYPES.items():
        out[f"event.{name}.json"] = _schema(cls, name)
    for name, cmd in COMMAND_TYPES.items():
        out[f"command.{name}.json"] = _schema(cmd, name)
    out["event.json"] = _schema(EVENT_ADAPTER, "Event")
    out["command.json"] = _schema(COMMAND_ADAPTER, "Command")
    out["command-reply.json"] = _schema(CommandReply, "CommandReply")
    out["predict-request.json"] = _schema(PredictRequest, "PredictRequest")
    out["predict-reply.json"] = _schema(PredictReply, "PredictReply")
    return out
