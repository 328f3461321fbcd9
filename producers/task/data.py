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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from producers.task.labels import LabelSet
from runtime.errors import ConfigError

ANSWER_PREFIX = '{"decision": '
"""The start of every answer: what follows is the label as a JSON string, or ``null``."""

_KEYS = ("text", "label", "rationale", "metadata")
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


def _parse_row(obj: Any, labels: LabelSet) -> tuple[str, str | None, str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {json_type(obj)}")
    for key in obj:
        if key not in _KEYS:
            raise RowError(f"field {key!r}: unknown key (allowed: {', '.join(_KEYS)})")
    if "text" not in obj:
        raise RowError("field 'text': required")
    text = obj["text"]
    if not isinstance(text, str):
        raise RowError(f"field 'text': expected a string, got {json_type(text)}")
    if not text.strip():
        raise RowError("field 'text': must not be empty")
    if "label" not in obj:
        raise RowError("field 'label': required (null marks an ambiguous text)")
    label = obj["label"]
    if label is not None and (not isinstance(label, str) or label not in labels.names):
        shown = json.dumps(label) if not isinstance(label, str) else repr(label)
        raise RowError(f"field 'label': {shown} is not one of {', '.join(labels.names)} (or null to abstain)")
    rationale = obj.get("rationale")
    if rationale is None:
        rationale = default_rationale(label)
    elif not isinstance(rationale, str):
        raise RowError(f"field 'rationale': expected a string, got {json_type(rationale)}")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise RowError(f"field 'metadata': expected an object, got {json_type(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, _SCALARS):
            raise RowError(f"field 'metadata.{key}': expected a string, number or boolean, got {json_type(value)}")
    return text, label, rationale, metadata


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
        text, label, rationale, metadata = _parse_row(obj, labels)
        return Example(text=text, label=label, rationale=rationale, metadata=metadata, source=where)

    return read_jsonl(path, parse, skip_invalid=skip_invalid)


def answer_json(example: Example) -> str:
    """The answer the model is trained to write: decision, rationale, abstain, in that order."""
    return json.dumps({"decision": example.label, "rationale": example.rationale, "abstain": example.label is None})


def _metadata_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def build_prompt(example: Example, system_prompt: str) -> str:
    """The prompt for ``example``; the model's answer (``answer_json``) follows it directly.

    Layout: the system prompt, ``Text: <text>``, one ``key: value`` line per metadata item (keys
    sorted), then ``Answer: `` with a trailing space.
    """
    lines = [system_prompt.strip(), f"Text: {example.text}"]
    lines += [f"{key}: {_metadata_value(example.metadata[key])}" for key in sorted(example.metadata)]
    lines.append("Answer: ")
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
