"""The predictor's contract: what a client sends to ``trainbus.predict.<alias>``, what it gets
back, and the ``predictor.loaded`` event each (re)load of a served checkpoint publishes.

Request: ``{"text": "..."}`` or ``{"texts": ["...", ...]}`` (plus ``metadata`` and
``rationale``; the metadata keys the model knows are in ``$SRV.INFO`` and ``predictor.loaded``).
Reply: ``{"answers": [...]}``, one answer per text in order. A bad request gets no body but the
NATS service error headers (``Nats-Service-Error``: one line naming the field,
``Nats-Service-Error-Code``: ``400`` bad input, ``413`` text too long, ``500`` the model failed).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from schemas.common import RUN_ID_PATTERN, Envelope, Model, NonNegativeFinite, RunId

Alias = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]
"""A served name: like a run id, 1-64 of ``[A-Za-z0-9_-]``, one subject token."""
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MetadataValue = str | int | float | bool

MAX_VALUES_SEEN = 20
MAX_VALUE_CHARS = 100
MetadataSeen = dict[str, list[Annotated[str, Field(max_length=MAX_VALUE_CHARS)]]]
"""Metadata key -> the values a model saw in training (as its prompt writes them), at most
``MAX_VALUES_SEEN`` per key: what a request may add to the text."""

MAX_TEXTS = 256
"""Texts in one request; a client with more sends several requests."""


class PredictRequest(Model):
    """One text or several to classify. ``metadata`` is added to every text's prompt as in training."""

    # exactly one of text/texts, said in the JSON Schema too so a client in another language knows
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["texts"]}]})

    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_TEXTS)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    """``key: value`` lines of the prompt (e.g. ``{"channel": "chat"}``), as the training rows' metadata."""
    rationale: bool = True
    """False skips generating the rationale: the answer comes several times faster."""

    @model_validator(mode="after")
    def _one_way_to_send(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' and 'texts'")
        items = (
            [("text", self.text)]
            if self.text is not None
            else [(f"texts.{i}", t) for i, t in enumerate(self.texts or [])]
        )
        for where, value in items:
            if not value or not value.strip():
                raise ValueError(f"{where}: must not be empty")
        return self


class CheckpointRef(Model):
    """Which checkpoint computed an answer."""

    run_id: RunId
    step: Annotated[int, Field(ge=0)]
    sha256: Sha256


class Answer(Model):
    """The classifier's answer to one text, as the model was trained to give it."""

    decision: str | None
    """The label, or None when the answer abstains."""
    abstain: bool
    rationale: str | None
    """Generated with a bounded number of tokens; None when the request asked for ``rationale: false``."""
    probabilities: dict[str, float]
    """Probability of each label, and of ``null`` (the model's own abstention), summing to 1."""
    checkpoint: CheckpointRef


class PredictReply(Model):
    """The reply to a ``PredictRequest``: one answer per text, in the request's order."""

    answers: list[Answer]


class PredictorLoaded(Envelope):
    """A predictor now serves this checkpoint under ``alias`` (at start and on every hot swap).

    ``source`` is ``predictor``; ``attempt`` is the checkpoint's; ``seq`` counts the run's
    ``predictor.loaded`` events from 1 without gaps, whichever replica published them;
    ``event_id`` is ``<run_id>.predictor.<instance>.<n>``, this instance's n-th load.
    """

    type: Literal["predictor.loaded"] = "predictor.loaded"
    alias: Alias
    subject: str
    step: Annotated[int, Field(ge=0)]
    checkpoint_path: str
    sha256: Sha256
    checkpoint_event_id: str | None = None
    verdict: Literal["approved", "rejected", "pending"]
    """The audit verdict it was served under; anything but approved needed ``--force``."""
    forced: bool = False
    trigger: Literal["start", "hot_swap"] = "start"
    previous_step: Annotated[int, Field(ge=0)] | None = None
    instance: str
    """The NATS service instance id (``$SRV.INFO``) that loaded it."""
    host: str = ""
    load_seconds: NonNegativeFinite = 0.0
    metadata_seen: MetadataSeen = Field(default_factory=dict)
    """The metadata keys the model was trained with and the values seen (its run's ``run.started``):
    optional ``metadata`` of a request. Empty when the run has none, or from an older predictor."""
