"""JSONL examples for the risk classifier, and the prompt/answer text the model is trained on.

One JSON object per line::

    {"text": "...", "label": "HIGH_RISK" | ... | null, "rationale": "...", "metadata": {"channel": "chat"}}

``label: null`` marks an ambiguous text whose right answer is to abstain. The training sequence
is ``build_prompt(ex, system_prompt) + answer_json(ex)``; every answer starts with
``ANSWER_PREFIX``, so the decision is the first thing the model writes after the prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producers.task.labels import LabelSet
from runtime.errors import ConfigError
from schemas.predict import MAX_VALUE_CHARS, MAX_VALUES_SEEN

ANSWER_PREFIX = '{"decision": '
"""The start of every answer: what follows is the label as a JSON string, or ``null``."""

_SCALARS = (str, int, float, bool)
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One labelled text. ``label`` None means: ambiguous, the right answer is to abstain."""

    text: str
    label: str | None
    rationale: str
    metadata: dict[str, Any]
    source: str
    """Where the row came from, ``path:line``."""


class RowError(ValueError):
    """A row that cannot be used; the message names the field."""


def default_rationale(label: str | None) -> str:
    """Rationale used for a row that has none."""
    if label is None:
        return "The text is ambiguous; abstaining."
    return f"The text matches {label}."


def _scalar(value: Any) -> Any:
    if not isinstance(value, _SCALARS):
        raise ValueError(f"expected a string, number or boolean, got {json_type(value)}")
    return value


class Row(BaseModel):
    """One JSONL row of the classifier, checked field by field (the label set comes as the
    validation context ``{"labels": LabelSet}``); ``parse_row`` turns a failure into one ``RowError``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    label: str | None
    rationale: str | None = None
    metadata: dict[str, Annotated[str | int | float | bool, BeforeValidator(_scalar)]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {json_type(data)}")
        return data

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {json_type(value)}")
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, value: Any, info: ValidationInfo) -> Any:
        names: list[str] = info.context["labels"].names if info.context else []
        if value is None or (isinstance(value, str) and value in names):
            return value
        shown = repr(value) if isinstance(value, str) else json.dumps(value)
        raise ValueError(f"{shown} is not one of {', '.join(names)} (or null to abstain)")

    @field_validator("rationale", mode="before")
    @classmethod
    def _rationale(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"expected a string, got {json_type(value)}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {json_type(value)}")
        return value


_REQUIRED_HINT = {"label": " (null marks an ambiguous text)"}


def parse_row(obj: Any, labels: LabelSet) -> Row:
    """``obj`` (one parsed JSON line) as a ``Row``; ``RowError`` names the first bad field, unknown keys first."""
    try:
        return Row.model_validate(obj, context={"labels": labels})
    except ValidationError as exc:
        err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        field = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(Row.model_fields)})"
        elif err["type"] == "missing":
            message = "required" + _REQUIRED_HINT.get(field, "")
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        raise RowError(f"field {field!r}: {message}" if field else message) from None


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


SKIP_HINT = "set data.skip_invalid=true to skip bad rows instead"


def read_jsonl(path: str | Path, parse: Callable[[Any, str], T], *, skip_invalid: bool = False) -> tuple[list[T], int]:
    """Read a JSONL data file with ``parse(obj, "path:line")`` per row: (rows, number skipped).

    Blank lines are ignored. A bad row (``parse`` raises ``RowError``) raises ``ConfigError``
    naming ``path:line`` and the field, unless ``skip_invalid``, which skips and counts it. A
    file without one usable row is an error either way.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such data file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    rows: list[T] = []
    skipped = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:
                raise RowError("not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise RowError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            rows.append(parse(obj, where))
        except RowError as exc:
            if not skip_invalid:
                raise ConfigError(f"{where}: {exc} ({SKIP_HINT})") from None
            skipped += 1
    if not rows:
        detail = f" ({skipped} invalid rows skipped)" if skipped else ""
        raise ConfigError(f"{path}: no examples{detail}")
    return rows, skipped


def read_examples(path: str | Path, labels: LabelSet, *, skip_invalid: bool = False) -> tuple[list[Example], int]:
    """Read a JSONL file of the classifier's rows: (examples, number of rows skipped); see ``read_jsonl``."""

    def parse(obj: Any, where: str) -> Example:
        row = parse_row(obj, labels)
        rationale = row.rationale if row.rationale is not None else default_rationale(row.label)
        return Example(row.text, row.label, rationale, dict(row.metadata), source=where)

    return read_jsonl(path, parse, skip_invalid=skip_invalid)


def answer_json(example: Example) -> str:
    """The answer the model is trained to write: decision, rationale, abstain, in that order."""
    return json.dumps({"decision": example.label, "rationale": example.rationale, "abstain": example.label is None})


def _metadata_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def metadata_seen(examples: Sequence[Example], limit: int = MAX_VALUES_SEEN) -> dict[str, list[str]]:
    """Each metadata key of ``examples`` with the values seen, as the prompt writes them: sorted,
    the first ``limit`` of those up to ``MAX_VALUE_CHARS`` long (a longer one is free text, not a
    choice). What a request may add to its text (``trainbus serve`` says it)."""
    values: dict[str, set[str]] = {}
    for example in examples:
        for key, value in example.metadata.items():
            shown = values.setdefault(key, set())
            if len(written := _metadata_value(value)) <= MAX_VALUE_CHARS:
                shown.add(written)
    return {key: sorted(seen)[:limit] for key, seen in sorted(values.items())}


def build_prompt(example: Example, system_prompt: str) -> str:
    """The prompt for ``example``; the model's answer (``answer_json``) follows it directly.

    Layout: the system prompt, one ``key: value`` line per metadata item (keys sorted), ``Text:
    <text>``, then ``Answer: `` with a trailing space. The metadata comes first so that what
    follows the text is the same with or without it: a request with the text alone differs from
    one with its metadata only in lines the model reads before the text.
    """
    lines = [system_prompt.strip()]
    lines += [f"{key}: {_metadata_value(example.metadata[key])}" for key in sorted(example.metadata)]
    lines += [f"Text: {example.text}", "Answer: "]
    return "\n".join(lines)


def data_fingerprint(paths: list[Path]) -> str:
    """sha256 hex over each file's name and bytes, in the order given; independent of directory."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            content = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such data file") from None
        name = Path(path).name.encode()
        # Lengths first, so (name, bytes) boundaries cannot be shifted between files.
        digest.update(f"{len(name)}:{len(content)}:".encode())
        digest.update(name)
        digest.update(content)
    return digest.hexdigest()
