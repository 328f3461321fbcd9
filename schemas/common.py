"""Shared field types and the event envelope of the trainbus contract.

Non-finite floats matter here: a NaN loss is exactly what the audit gate must see, so metric
fields serialise NaN/±inf as the JSON strings "NaN", "Infinity", "-Infinity" (readable by any
JSON parser) and accept them back. The JSON Schema of such a field says so.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

SCHEMA_VERSION = 1
"""The contract's version, written in every event. It goes up only on a breaking change (a field
removed, renamed, retyped or given a new meaning); adding a field or an event type keeps it.
A reader skips events whose version is higher than the one it knows (docs/architecture.md)."""
RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SWEEP_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,48}$"
"""A sweep name: its trials' run ids ``<name>-t<k>`` must still be run ids."""
NON_FINITE_STRINGS = ("NaN", "Infinity", "-Infinity")

RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]
"""A run id: 1-64 of ``[A-Za-z0-9_-]``, so it is safe as one NATS subject token."""

SourceName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
ShortText = Annotated[str, StringConstraints(max_length=2000)]

MetricFloat = Annotated[
    float,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number"},
                {"type": "string", "enum": list(NON_FINITE_STRINGS)},
            ],
            "description": 'A number; non-finite values are the strings "NaN", "Infinity", "-Infinity".',
        }
    ),
]
"""A float that may be non-finite (a diverged loss); round-trips through JSON as a string."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


FiniteFloat = Annotated[float, AfterValidator(_finite), Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1)]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Model(BaseModel):
    """Base of every message: unknown fields are rejected, NaN survives JSON as a string.

    ``extra="forbid"`` makes writers strict: a typo in a field name fails where the message is
    built. Readers are tolerant instead (``parse_event`` ignores fields it does not know). In the
    serialization-mode JSON Schema every field with a default is ``required``: the writer always
    writes it, so a reader in any language may rely on it.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        ser_json_inf_nan="strings",
        validate_default=False,
        json_schema_serialization_defaults_required=True,
    )


class Envelope(Model):
    """Fields every event carries (see docs/architecture.md, "The contract")."""

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:-]+$")]
    run_id: RunId
    attempt: Annotated[int, Field(ge=1)] = 1
    seq: Annotated[int, Field(ge=1)]
    source: SourceName = "trainer"
    time: AwareDatetime = Field(default_factory=utc_now)
    schema_version: Annotated[int, Field(ge=1)] = SCHEMA_VERSION


JsonDict = dict[str, Any]


class SweepTag(Model):
    """The sweep a run is a trial of (``trainbus sweep``), so any consumer can group its runs; in
    ``run.started`` and in a queued trial's job."""

    name: Annotated[str, StringConstraints(pattern=SWEEP_NAME_PATTERN)]
    trial: Annotated[int, Field(ge=0)]
    """The Optuna trial number: the run id is ``<name>-t<trial>``."""
