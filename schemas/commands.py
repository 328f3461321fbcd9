"""Control commands an operator (or the audit gate) sends to a run, and the trainer's reply.

Bounds live here so an out-of-range value is rejected before it reaches the trainer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

from schemas.common import (
    Model,
    NonNegativeFinite,
    PositiveFinite,
    RunId,
    ShortText,
    utc_now,
)

CommandId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
Interval = Annotated[int, Field(ge=1, le=10_000_000)]

SETTABLE = ("learning_rate", "max_grad_norm", "weight_decay", "eval_steps", "save_steps", "logging_steps")


def _command_schema(schema: dict[str, Any], cls: type) -> None:
    """``type`` is the discriminator: the trainer rejects a command without it, so the schema
    (validation mode, where a default makes a field optional) must say it is required."""
    schema["required"] = ["type", *[name for name in schema.get("required", []) if name != "type"]]


def _set_schema(schema: dict[str, Any], cls: type) -> None:
    _command_schema(schema, cls)
    # the model validator of SetHyperparameters in JSON Schema terms: at least one value to set
    schema["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in SETTABLE]


class CommandBase(Model):
    """Fields every command carries. ``issued_by`` is a record, not a credential."""

    model_config = ConfigDict(json_schema_extra=_command_schema)

    command_id: CommandId
    run_id: RunId
    issued_by: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    time: AwareDatetime = Field(default_factory=utc_now)


class Pause(CommandBase):
    """Block training at the next step boundary, model kept in memory."""

    type: Literal["pause"] = "pause"


class Resume(CommandBase):
    """Continue a paused run from the step it paused at."""

    type: Literal["resume"] = "resume"


class Stop(CommandBase):
    """End the run at the next step boundary (saving a checkpoint first unless ``save`` is false)."""

    type: Literal["stop"] = "stop"
    save: bool = True


class SaveCheckpoint(CommandBase):
    """Write a checkpoint at the next step boundary."""

    type: Literal["save_checkpoint"] = "save_checkpoint"


class Evaluate(CommandBase):
    """Run an evaluation at the next step boundary."""

    type: Literal["evaluate"] = "evaluate"


class SetHyperparameters(CommandBase):
    """Change hyper-parameters live; names and meanings as in ``TrainingArguments``.

    ``learning_rate`` is the schedule's peak: later steps get what a run started with it would.
    """

    model_config = ConfigDict(json_schema_extra=_set_schema)

    type: Literal["set"] = "set"
    learning_rate: Annotated[PositiveFinite, Field(le=10.0)] | None = None
    max_grad_norm: Annotated[PositiveFinite, Field(le=1e6)] | None = None
    weight_decay: Annotated[NonNegativeFinite, Field(le=10.0)] | None = None
    eval_steps: Interval | None = None
    save_steps: Interval | None = None
    logging_steps: Interval | None = None

    @model_validator(mode="after")
    def _something_to_set(self) -> SetHyperparameters:
        if all(getattr(self, name) is None for name in SETTABLE):
            raise ValueError(f"set needs at least one of: {', '.join(SETTABLE)}")
        return self

    def changes(self) -> dict[str, float | int]:
        """The fields this command sets (those not None)."""
        return {name: value for name in SETTABLE if (value := getattr(self, name)) is not None}


Command = Annotated[
    Pause | Resume | Stop | SaveCheckpoint | Evaluate | SetHyperparameters,
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_TYPES = {
    cls.model_fields["type"].default: cls for cls in (Pause, Resume, Stop, SaveCheckpoint, Evaluate, SetHyperparameters)
}

RejectCode = Literal["invalid", "not_applicable", "duplicate", "wrong_run", "finished"]


class CommandReply(Model):
    """The trainer's immediate answer on the request/reply control subject."""

    command_id: str | None = None
    status: Literal["accepted", "rejected"]
    code: RejectCode | Literal[""] = ""
    message: ShortText = ""
    step: int | None = None


def parse_command(data: bytes | str) -> Command:
    """Parse one command from JSON; raises ``pydantic.ValidationError`` on bad input."""
    return COMMAND_ADAPTER.validate_json(data)
