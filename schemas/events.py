"""Every event the trainer and the consumers publish, and one union that parses any of them.

Each class is a plain pydantic model with a ``type`` discriminator; the subject an event
travels on is ``trainbus.events.<run_id>.<type>`` (see ``schemas.subjects``). A new event type
is a class here and one more member of the ``Event`` union.

Strict on write, tolerant on read: building an event refuses unknown fields, ``parse_event``
ignores them, and refuses (``NewerSchema``) an event of a ``schema_version`` above this code's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError

from schemas.common import (
    RUN_ID_PATTERN,
    SCHEMA_VERSION,
    Envelope,
    JsonDict,
    MetricFloat,
    Model,
    NonNegativeFinite,
    RunId,
    ShortText,
    SweepTag,
)
from schemas.jobs import JobState, LaunchTag
from schemas.predict import MetadataSeen, PredictorLoaded

RunStateName = Literal["running", "paused", "stopping"]
FinishStatus = Literal["completed", "stopped", "failed"]
Severity = Literal["info", "warning", "critical"]
CommandStatus = Literal["accepted", "applied", "rejected"]
Count = Annotated[int, Field(ge=0)]
Step = Annotated[int, Field(ge=0)]


class Hyperparameters(Model):
    """The hyper-parameters an operator may change live, as in ``TrainingArguments``."""

    learning_rate: NonNegativeFinite
    max_grad_norm: NonNegativeFinite | None = None
    weight_decay: NonNegativeFinite = 0.0
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    save_steps: Annotated[int, Field(ge=1)] | None = None
    logging_steps: Annotated[int, Field(ge=1)] = 1


class ForkTag(Model):
    """The run a fork (`trainbus train --fork RUN@STEP`) was started from, and what it changed."""

    parent: RunId
    step: Step
    """The parent's checkpoint step the fork continues from (its own steps count on from there)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """The sha256 of that checkpoint, as its ``checkpoint`` event announced it (checked before training)."""
    checkpoint_event_id: str
    changed: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Each config key the fork set otherwise: ``{"training.learning_rate": {"from": 0.003, "to": 0.001}}``."""


class RunStarted(Envelope):
    """A run (or a resumed attempt of it) began; carries what is needed to reproduce it."""

    type: Literal["run.started"] = "run.started"
    config: JsonDict
    config_hash: str
    model: str
    adapter: str
    data_fingerprint: str
    world_size: Annotated[int, Field(ge=1)] = 1
    hyperparameters: Hyperparameters
    max_steps: Step | None = None
    trainable_parameters: Count | None = None
    total_parameters: Count | None = None
    resumed_from_step: Step | None = None
    host: str = ""
    sweep: SweepTag | None = None
    """Set when the run is a trial of a hyper-parameter sweep; absent in events of older trainers."""
    fork: ForkTag | None = None
    """Set when the run is a fork of another run's checkpoint; absent otherwise (and in older trainers' events)."""
    group: Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)] | None = None
    """Runs started together to be compared as one group (`trainbus train --seeds N`): the first one's run id."""
    launch: LaunchTag | None = None
    """Set when a `trainbus agent` started the run (its job, the agent, the GPUs it saw); absent otherwise."""
    metadata_seen: MetadataSeen = Field(default_factory=dict)
    """The metadata keys of the training rows' prompts, each with the values seen there (classify
    runs; empty for chat and in events of older trainers)."""


class RunState(Envelope):
    """The trainer changed state (running, paused, stopping)."""

    type: Literal["run.state"] = "run.state"
    state: RunStateName
    step: Step
    reason: ShortText = ""


class RunFinished(Envelope):
    """The run ended: completed, stopped by a command or signal, or failed with an error."""

    type: Literal["run.finished"] = "run.finished"
    status: FinishStatus
    step: Step
    reason: ShortText = ""
    error: ShortText | None = None
    outbox_pending: Count = 0


class TrainStep(Envelope):
    """Training metrics at the logging cadence."""

    type: Literal["train.step"] = "train.step"
    step: Step
    epoch: MetricFloat
    loss: MetricFloat
    learning_rate: MetricFloat
    grad_norm: MetricFloat | None = None
    tokens_per_second: MetricFloat = 0.0
    samples_per_second: MetricFloat = 0.0
    step_time_seconds: MetricFloat = 0.0
    memory_bytes: Count = 0
    hyperparameters: Hyperparameters | None = None


class Evaluation(Envelope):
    """Evaluation of the model: the eval loss, plus the metrics of the run's task.

    The risk classifier (``data.task: classify``) fills the classification fields; chat
    fine-tuning (``chat``) fills ``perplexity`` and leaves them None. A reader must cope with
    any of them absent.
    """

    type: Literal["eval"] = "eval"
    step: Step
    epoch: MetricFloat | None = None
    loss: MetricFloat
    """Mean cross-entropy per trained token (the answer, or the assistant turns)."""
    perplexity: MetricFloat | None = None
    """``exp(loss)``: chat runs."""
    accuracy: MetricFloat | None = None
    """Correct answers over labelled examples; an abstention on a labelled example counts as wrong."""
    macro_f1: MetricFloat | None = None
    """Mean F1 over the labels seen or predicted, from answered examples only: abstentions are
    left out (they are neither a true nor a false positive of any label); ``num_abstained`` counts them."""
    per_label_f1: dict[str, MetricFloat] = Field(default_factory=dict)
    """F1 per label, answered examples only (as ``macro_f1``)."""
    abstain_rate: MetricFloat | None = None
    """Abstentions over all evaluated examples."""
    ece: MetricFloat | None = None
    critical_error_cost: MetricFloat | None = None
    labels: list[str] = Field(default_factory=list)
    confusion_matrix: list[list[Count]] = Field(default_factory=list)
    """Rows: true label, columns: answer (``labels`` order), answered examples only."""
    num_samples: Count = 0
    num_abstained: Count | None = None
    """How many of the ``num_samples`` examples the model abstained on."""
    text_only_accuracy: MetricFloat | None = None
    """``accuracy`` of the same examples sent with the text alone (no metadata lines), as
    `trainbus predict "TEXT"` sends them; None from a trainer that did not measure it."""
    text_only_abstain_rate: MetricFloat | None = None
    """``abstain_rate`` of the same examples sent with the text alone; None as ``text_only_accuracy``."""
    trigger: Literal["scheduled", "command", "final"] = "scheduled"


class Checkpoint(Envelope):
    """A checkpoint was written; sha256 and size let a consumer verify what it promotes."""

    type: Literal["checkpoint"] = "checkpoint"
    step: Step
    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: Count
    metrics: dict[str, MetricFloat] = Field(default_factory=dict)
    trigger: Literal["scheduled", "command", "signal", "final"] = "scheduled"


class CommandResult(Envelope):
    """What happened to a control command: the audit trail of every operator action."""

    type: Literal["command.result"] = "command.result"
    command_id: str
    command: str
    status: CommandStatus
    code: str = ""
    message: ShortText = ""
    issued_by: str = ""
    step: Step | None = None
    applied: JsonDict = Field(default_factory=dict)


class AuditFlag(Envelope):
    """A rule of the audit gate fired."""

    type: Literal["audit.flag"] = "audit.flag"
    rule: str
    severity: Severity
    step: Step | None = None
    message: ShortText
    judged_event_id: str
    value: MetricFloat | None = None
    threshold: MetricFloat | None = None
    actions: list[str] = Field(default_factory=list)
    actions_taken: list[str] = Field(default_factory=list)


class AuditVerdict(Envelope):
    """The audit gate's one verdict on one checkpoint; only approved ones are promotable."""

    type: Literal["audit.verdict"] = "audit.verdict"
    checkpoint_event_id: str
    checkpoint_step: Step
    checkpoint_path: str
    verdict: Literal["approved", "rejected"]
    reasons: list[ShortText] = Field(default_factory=list)
    metrics: dict[str, MetricFloat] = Field(default_factory=dict)
    eval_event_id: str | None = None


class RunTag(Envelope):
    """Someone labelled a run (``trainbus tag RUN key=value``); an empty value removes the key.

    ``source`` is ``user``; ``attempt`` is the run's latest; ``seq`` counts the run's ``run.tag``
    and ``run.note`` events from 1; ``event_id`` is ``<run_id>.user.tag.<unique>``.
    """

    type: Literal["run.tag"] = "run.tag"
    tags: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Annotated[str, Field(max_length=256)]]
    issued_by: str = ""


class RunNote(Envelope):
    """A note about a run (``trainbus note RUN "text"``), kept in its event stream.

    Numbered as ``RunTag`` (``event_id`` ``<run_id>.user.note.<unique>``).
    """

    type: Literal["run.note"] = "run.note"
    text: Annotated[str, Field(min_length=1, max_length=2000)]
    issued_by: str = ""


class Heartbeat(Envelope):
    """Sent every few seconds, also while paused or evaluating, so a stall is visible."""

    type: Literal["heartbeat"] = "heartbeat"
    step: Step
    phase: Literal["starting", "training", "evaluating", "saving", "paused", "stopping"]
    uptime_seconds: NonNegativeFinite = 0.0


Event = Annotated[
    RunStarted
    | RunState
    | RunFinished
    | TrainStep
    | Evaluation
    | Checkpoint
    | CommandResult
    | AuditFlag
    | AuditVerdict
    | Heartbeat
    | PredictorLoaded
    | RunTag
    | RunNote
    | JobState,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_CLASSES: tuple[type[Envelope], ...] = get_args(get_args(Event)[0])
"""The members of ``Event``, in order: adding a class to the union adds it everywhere."""
EVENT_TYPES: dict[str, type[Envelope]] = {cls.model_fields["type"].default: cls for cls in EVENT_CLASSES}


class NewerSchema(ValueError):
    """The event was written under a ``schema_version`` this code does not know yet."""

    def __init__(self, version: int) -> None:
        super().__init__(f"schema_version {version} is newer than {SCHEMA_VERSION}, the one this trainbus reads")
        self.version = version


def _declared_version(data: bytes | str) -> int | None:
    """The ``schema_version`` a JSON object declares, if it is an integer."""
    try:
        obj: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def parse_event(data: bytes | str) -> Event:
    """Parse one event from JSON as a reader: fields this code does not know are ignored.

    Raises ``NewerSchema`` for an event of a later ``schema_version`` (even one that happens to
    parse: its fields may mean something else now), ``pydantic.ValidationError`` on bad input.
    """
    try:
        event = EVENT_ADAPTER.validate_json(data, extra="ignore")
    except ValidationError:
        version = _declared_version(data)
        if version is not None and version > SCHEMA_VERSION:
            raise NewerSchema(version) from None
        raise
    if event.schema_version > SCHEMA_VERSION:
        raise NewerSchema(event.schema_version)
    return event
