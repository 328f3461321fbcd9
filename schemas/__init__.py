"""The trainbus contract: pydantic models of every event and command, and subject names.

No I/O and no torch here; every process imports this package and nothing else to talk on
the bus.
"""

from schemas.commands import (
    COMMAND_ADAPTER,
    Command,
    CommandReply,
    Evaluate,
    Pause,
    Resume,
    SaveCheckpoint,
    SetHyperparameters,
    Stop,
    parse_command,
)
from schemas.common import SCHEMA_VERSION, MetricFloat, RunId
from schemas.events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    Heartbeat,
    Hyperparameters,
    NewerSchema,
    RunFinished,
    RunStarted,
    RunState,
    TrainStep,
    parse_event,
)
from schemas.subjects import (
    ALL_EVENTS,
    EVENTS_STREAM,
    check_run_id,
    control_subject,
    event_subject,
    run_events,
)

__all__ = [
    "ALL_EVENTS",
    "COMMAND_ADAPTER",
    "EVENTS_STREAM",
    "EVENT_ADAPTER",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "AuditFlag",
    "AuditVerdict",
    "Checkpoint",
    "Command",
    "CommandReply",
    "CommandResult",
    "Evaluate",
    "Evaluation",
    "Event",
    "Heartbeat",
    "Hyperparameters",
    "MetricFloat",
    "NewerSchema",
    "Pause",
    "Resume",
    "RunFinished",
    "RunId",
    "RunStarted",
    "RunState",
    "SaveCheckpoint",
    "SetHyperparameters",
    "Stop",
    "TrainStep",
    "check_run_id",
    "control_subject",
    "event_subject",
    "parse_command",
    "parse_event",
    "run_events",
]
