"""Typed settings: YAML file, then ``TRAINBUS_*`` environment variables, then ``--set`` overrides.

Any pydantic model can be loaded this way (``load_config``). Every mistake is reported, each
blamed on where the value came from: ``file:line`` for the YAML, the environment variable's
name, or the ``--set`` item. A relative path written in a config file is relative to that file;
one given with ``--set`` or an environment variable, or left at its default, is relative to the
current folder. Bus credentials follow the NATS ecosystem's own variables (``NATS_URL``,
``NATS_USER`` …) and are never part of a run config.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from runtime.errors import ConfigError

ENV_PREFIX = "TRAINBUS_"
M = TypeVar("M", bound=BaseModel)
_USERINFO = re.compile(r"//[^/@]*@")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The folder trainbus is installed from: its own ``configs/`` live here."""

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
"""(where in the config, what is wrong) — what a ``check`` after validation returns."""


def redact_url(url: str) -> str:
    """``nats://user:secret@host`` → ``nats://***@host``: URLs are logged, secrets are not."""
    return _USERINFO.sub("//***@", url)


def packaged(path: str) -> str:
    """``path`` when it exists from here; else trainbus's own copy (``configs/…``) when that exists.

    Every command's config, space, rules and labels file goes through it (as its argparse ``type=``),
    so ``trainbus train configs/tiny.yaml``, ``trainbus sweep configs/tiny.yaml --space
    configs/sweeps/tiny.yaml`` and the default ``configs/labels.yaml`` work from any folder alike.
    """
    if Path(path).is_absolute() or Path(path).exists() or not (PROJECT_ROOT / path).exists():
        return path
    return str(PROJECT_ROOT / path)


@dataclass(frozen=True)
class ConfigPath:
    """Marks a ``str`` field as a path (``Annotated[str, ConfigPath()]``), resolved against the
    config file it is written in. ``dotted_only``: only ``./x`` and ``../x`` are paths (a model
    field that may also be a hub id)."""

    dotted_only: bool = False


PATH = ConfigPath()


class Section(BaseModel):
    """Base of config sections: unknown keys are mistakes, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    extra_paths: ClassVar[frozenset[str]] = frozenset()
    """Keys outside the declared fields (a section that allows extras) that hold paths."""


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
    objects_max_bytes: int = Field(2 << 30, gt=0)
    """Size limit of the object store holding checkpoint folders (``TRAINBUS_CHECKPOINT_FILES``); set when
    it is created. A checkpoint that does not fit stays on its trainer's disk."""


class ServerSettings(Section):
    """The embedded nats-server (``trainbus up`` / ``trainbus nats``)."""

    binary: str | None = None
    """Path to ``nats-server``; default: the venv's ``bin/``, then PATH."""
    port: int = Field(-1, ge=-1, le=65535)
    """-1 picks a free port."""
    host: str = "127.0.0.1"
    max_memory_bytes: int = Field(256 << 20, gt=0)
    max_file_bytes: int = Field(4 << 30, gt=0)
    config_file: Annotated[str | None, PATH] = None
    """Optional nats-server config (e.g. configs/nats/roles.conf) to include."""
    cores: int = Field(1, ge=0)
    """Cores nats-server runs Go code on at once (``GOMAXPROCS``). 1 costs the least CPU per event
    when it shares the machine with a trainer: it hands work between fewer threads. 0: every core."""


class LogSettings(Section):
    """Logging: JSON when stderr is not a terminal, unless ``format`` says otherwise."""

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


SHARED_SECTIONS = frozenset(Settings.model_fields)
"""Top-level keys every process shares (where the bus is, logging): never part of a run's own config."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML so numbers and booleans are typed)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=40")
    return key.strip().split("."), _typed(raw)


def _typed(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, list[str], Any]]:
    """``TRAINBUS_TRAINING__MAX_STEPS=40`` → ("TRAINBUS_TRAINING__MAX_STEPS", ["training", "max_steps"], 40)."""
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            out.append((name, [p.lower() for p in name[len(ENV_PREFIX) :].split("__")], _typed(raw)))
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


def yaml_line(path: Path, loc: Loc) -> int | None:
    """1-based line of the deepest node of ``loc`` present in the YAML file, if it can be found."""
    try:
        node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return None
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line = match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The ``Section`` subclass a field holds (``X`` or ``X | None``), if any."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_path(model: type[BaseModel], key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    info = model.model_fields.get(key)
    if info is None:
        return key in getattr(model, "extra_paths", frozenset())
    marker = next((m for m in info.metadata if isinstance(m, ConfigPath)), None)
    if marker is None:
        return False
    return not marker.dotted_only or value.startswith(("./", "../"))


def resolve_paths(model: type[BaseModel], tree: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of ``tree`` (as read from a file in ``folder``) absolute, in place."""
    for key, value in tree.items():
        if _is_path(model, key, value):
            path = Path(value).expanduser()
            tree[key] = str(path if path.is_absolute() else (folder / path).resolve())
        info = model.model_fields.get(key)
        section = _section_type(info.annotation) if info is not None else None
        if section is not None and isinstance(value, dict):
            resolve_paths(section, value, folder)


@dataclass
class Layers:
    """A config tree built from layers, remembering which layer set which key (to blame it)."""

    tree: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None
    origins: dict[Loc, str] = field(default_factory=dict)

    def put(self, path: list[str], value: Any, origin: str) -> None:
        node = self.tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{origin}: {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
        self.origins[tuple(path)] = origin

    def blame(self, loc: Loc) -> str:
        """Where the value at ``loc`` came from: ``--set …``, an environment variable, or file:line."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.origins:
                return self.origins[loc[:n]]
        if self.file is not None:
            line = yaml_line(self.file, loc)
            return f"{self.file}:{line}" if line is not None else str(self.file)
        return ""


def layers(
    model: type[BaseModel],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    base: tuple[dict[str, Any], str] | None = None,
) -> Layers:
    """The YAML file (its relative paths made absolute), then ``base`` (a run's saved sections,
    which replace the file's), then ``TRAINBUS_A__B`` variables, then ``a.b=v`` overrides."""
    built = Layers(file=Path(path) if path is not None else None)
    if path is not None:
        built.tree = read_yaml(Path(path))
        resolve_paths(model, built.tree, Path(path).resolve().parent)
    if base is not None:
        sections, origin = base
        for name, section in sections.items():
            built.tree[name] = section
            built.origins[(name,)] = origin
    for name, env_key, env_value in env_overrides(os.environ if environ is None else environ):
        built.put(env_key, env_value, f"environment variable {name}")
    for item in overrides:
        key, value = parse_override(item)
        built.put(key, value, f"--set {item}")
    return built


def _message(error: Any, model: type[BaseModel]) -> str:
    if error["type"] != "extra_forbidden":
        return str(error["msg"])
    return "unknown key" + did_you_mean(str(error["loc"][-1]), _known_keys(model, error["loc"][:-1]))


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    current: type[BaseModel] | None = model
    for key in loc:
        info = current.model_fields.get(str(key)) if current is not None else None
        current = _section_type(info.annotation) if info is not None else None
    return list(current.model_fields) if current is not None else []


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean max_steps?)`` when ``name`` looks like a misspelling of one of ``known``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def describe_problems(problems: Iterable[Problem], blame: Callable[[Loc], str]) -> str:
    """One line listing every problem, each as ``origin: dotted.key: message``."""
    parts = []
    for loc, message in problems:
        where = ".".join(str(p) for p in loc) or "(top level)"
        origin = blame(loc)
        parts.append(f"{origin}: {where}: {message}" if origin else f"{where}: {message}")
    return "; ".join(parts)


def describe_validation_error(exc: ValidationError, origin: str) -> str:
    """One line naming every failing field's dotted path (all blamed on ``origin``)."""
    problems = [
        (tuple(e["loc"]), "unknown key" if e["type"] == "extra_forbidden" else str(e["msg"])) for e in exc.errors()
    ]
    return describe_problems(problems, lambda loc: origin)


def validate_layers(model: type[M], built: Layers, check: Callable[[M], list[Problem]] | None = None) -> M:
    """``model`` from ``built``; a ``ConfigError`` lists every mistake, each blamed on its layer.

    ``check`` looks further at a valid config (e.g. against a library's own argument class) and
    returns its problems, reported the same way.
    """
    try:
        config = model.model_validate(built.tree)
    except ValidationError as exc:
        problems = [(tuple(e["loc"]), _message(e, model)) for e in exc.errors()]
        raise ConfigError(describe_problems(problems, built.blame)) from None
    found = check(config) if check is not None else []
    if found:
        raise ConfigError(describe_problems(found, built.blame))
    return config


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    check: Callable[[M], list[Problem]] | None = None,
) -> M:
    """Build ``model`` from a YAML file, ``TRAINBUS_A__B`` env variables and ``a.b=v`` overrides."""
    return validate_layers(model, layers(model, path, overrides, environ), check)
