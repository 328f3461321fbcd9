"""Typed settings: YAML file, then ``TRAINBUS_*`` environment variables, then ``--set`` overrides.

Any pydantic model can be loaded this way (``load_config``); the failing field's dotted path
and the file are named in the error. Bus credentials follow the NATS ecosystem's own
variables (``NATS_URL``, ``NATS_USER`` …) and are never part of a run config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from runtime.errors import ConfigError

ENV_PREFIX = "TRAINBUS_"
M = TypeVar("M", bound=BaseModel)
_USERINFO = re.compile(r"//[^/@]*@")


def redact_url(url: str) -> str:
    """``nats://user:secret@host`` → ``nats://***@host``: URLs are logged, secrets are not."""
    return _USERINFO.sub("//***@", url)


class Section(BaseModel):
    """Base of config sections: unknown keys are mistakes, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class BusSettings(Section):
    """Where the bus is. Leave ``url`` unset: NATS_URL, then ``trainbus up``, then embedded."""

    url: str | None = None
    """``nats://host:port`` (comma-separated for a cluster) or ``embedded``."""
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to wait for the first connection before giving up (exit 3)."""
    ack_timeout: float = Field(5.0, gt=0)
    """Seconds to wait for a JetStream publish ack before the publish is retried."""

    @field_serializer("url")
    def _without_password(self, url: str | None) -> str | None:
        # a dumped config is published (run.started) and written to the run folder
        return redact_url(url) if url else url


class StreamSettings(Section):
    """Limits of the ``TRAINBUS_EVENTS`` stream."""

    max_age_days: float = Field(30.0, gt=0)
    max_bytes: int = Field(1 << 30, gt=0)
    """Stream size limit in bytes (oldest events are dropped beyond it)."""
    duplicate_window_seconds: float = Field(600.0, ge=600.0)
    """JetStream de-duplication window; at least 10 minutes so retries after an outage dedupe."""
    replicas: int | None = Field(None, ge=1, le=5)
    """Copies of the stream and buckets; unset: 3 on a cluster of at least three servers, else 1."""


class ServerSettings(Section):
    """The embedded nats-server (``trainbus up`` / ``trainbus nats``)."""

    binary: str | None = None
    """Path to ``nats-server``; default: the venv's ``bin/``, then PATH."""
    port: int = Field(-1, ge=-1, le=65535)
    """-1 picks a free port."""
    host: str = "127.0.0.1"
    max_memory_bytes: int = Field(256 << 20, gt=0)
    max_file_bytes: int = Field(4 << 30, gt=0)
    config_file: str | None = None
    """Optional nats-server config (e.g. configs/nats/roles.conf) to include."""


class LogSettings(Section):
    """Logging: JSON when stdout is not a terminal, unless ``format`` says otherwise."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(Section):
    """Settings every trainbus process shares; run configs extend this with their own sections."""

    state_dir: str = ".trainbus"
    """Project-local state folder: embedded server store, the address `trainbus up` wrote."""
    bus: BusSettings = BusSettings()
    stream: StreamSettings = StreamSettings()
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML so numbers and booleans are typed)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=40")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _put(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    """``TRAINBUS_TRAINING__MAX_STEPS=40`` → (["training", "max_steps"], 40)."""
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            out.append((path, value))
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name file:line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def describe_validation_error(exc: ValidationError, origin: str) -> str:
    """One line naming the first failing field's dotted path (and how many more failed)."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{origin}: {where}: {msg}{more}"


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> M:
    """Build ``model`` from a YAML file, ``TRAINBUS_A__B`` env variables and ``a.b=v`` overrides."""
    tree: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    origin = str(path) if path is not None else "config"
    for key, value in env_overrides(os.environ if environ is None else environ):
        _put(tree, key, value, "environment")
    for item in overrides:
        key, value = parse_override(item)
        _put(tree, key, value, f"--set {item}")
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None
