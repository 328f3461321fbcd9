"""A client that knows only the exported JSON Schemas: it builds a message from a schema's
required fields alone, the way a schema-driven client in another language would.

It resolves ``$ref``/``$defs``, ``oneOf``/``anyOf`` (the first branch, and an object's own
``anyOf`` of ``required`` lists), ``const``, ``enum``, ``pattern`` (the subset of regular
expressions the schemas use), ``minimum``/``exclusiveMinimum``/``maximum``, ``minLength`` and the
``date-time`` format. A schema it cannot satisfy fails loudly, naming the pattern or keyword.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_TOKEN = re.compile(r"(\[[^\]]+\]|\\.|[^\[\\{+*?])(\{(\d+)(?:,(\d*))?\}|[+*?])?")


def string_for(pattern: str, min_length: int = 0) -> str:
    """The shortest string of the pattern's first choices: ``^[a-z][a-z0-9_-]{0,31}$`` gives ``a``."""
    body = pattern.removeprefix("^").removesuffix("$")
    out = []
    for match in _TOKEN.finditer(body):
        atom, quantifier, low = match.group(1), match.group(2), match.group(3)
        if atom.startswith("[^"):
            raise AssertionError(f"schema client: negated class in pattern {pattern!r}")
        char = atom[1] if atom.startswith(("[", "\\")) else atom
        count = int(low) if low is not None else (1 if quantifier in (None, "+") else 0)
        out.append(char * count)
    value = "".join(out)
    if len(value) < min_length and out:
        value += value[-1:] * (min_length - len(value))
    if not re.search(pattern, value):
        raise AssertionError(f"schema client: cannot build a string for pattern {pattern!r} (got {value!r})")
    return value


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _number(schema: dict[str, Any], integer: bool) -> float | int:
    if "minimum" in schema:
        value = schema["minimum"]
    elif "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"]
        value = low + 1 if integer else (low + min(schema.get("maximum", low + 1), low + 1)) / 2
    else:
        value = 0
    return int(value) if integer else float(value)


def _object(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    required = list(schema.get("required", []))
    for branch in (schema.get("anyOf", []) + schema.get("oneOf", []))[:1]:  # "one of": satisfy the first
        required += [name for name in branch.get("required", []) if name not in required]
    properties = schema.get("properties", {})
    return {name: required_payload(properties.get(name, {"type": "string"}), root) for name in required}


def _string(schema: dict[str, Any], root: dict[str, Any]) -> str:
    if schema.get("format") == "date-time":
        return datetime.now(UTC).isoformat()
    if "pattern" in schema:
        return string_for(schema["pattern"], schema.get("minLength", 0))
    return "x" * max(1, schema.get("minLength", 0))


def _array(schema: dict[str, Any], root: dict[str, Any]) -> list[Any]:
    return [required_payload(schema.get("items", {"type": "string"}), root)] * schema.get("minItems", 0)


def _untyped(schema: dict[str, Any], root: dict[str, Any]) -> Any:
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            return required_payload(schema[combinator][0], root)
    raise AssertionError(f"schema client: no type in {schema}")


# One builder per JSON Schema ``type`` (None: a bare ``oneOf``/``anyOf``).
_BUILDERS: dict[str | None, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    None: _untyped,
    "object": _object,
    "string": _string,
    "integer": lambda schema, root: _number(schema, integer=True),
    "number": lambda schema, root: _number(schema, integer=False),
    "boolean": lambda schema, root: False,
    "null": lambda schema, root: None,
    "array": _array,
}


def required_payload(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A value for ``schema`` made of what it requires and nothing else."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    builder = _BUILDERS.get(kind) if kind is None or isinstance(kind, str) else None
    if builder is None:
        raise AssertionError(f"schema client: unsupported type {kind!r}")
    return builder(schema, root)
