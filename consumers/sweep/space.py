"""The search space file of ``trainbus sweep``: parameters by config key, objective, sampler, pruner.

    # trainbus sweep configs/tiny.yaml --space configs/sweeps/tiny.yaml --trials 8
    objective: accuracy                  # default; `objective: critical_error_cost` is minimised
    sampler: {type: tpe, seed: 0}        # tpe | random | grid (grid: every parameter a list)
    pruner: {type: median, n_startup_trials: 2}
    parameters:
      training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
      adapter.r: [8, 16, 32]

A list is a categorical choice, ``{low, high}`` a range (integers when both ends are integers,
``log`` and ``step`` as in Optuna). Sampler and pruner options are the Optuna classes' own keyword
arguments. Every mistake is one ``file:line: field: problem`` error, found before a trial starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.errors import ConfigError
from runtime.settings import read_yaml, yaml_line

Metric = Literal["accuracy", "macro_f1", "loss", "ece", "abstain_rate", "critical_error_cost"]
Direction = Literal["maximize", "minimize"]
MAXIMISED = frozenset({"accuracy", "macro_f1"})
"""Metrics where higher is better; the others (loss, calibration error, costs) are minimised."""

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Strict):
    metric: Metric = "accuracy"
    """A field of the trials' ``eval`` events; the last evaluation of a completed run counts."""
    direction: Direction | None = None
    """Default: maximize accuracy and macro-F1, minimize the rest."""


class Range(_Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class Choice(_Strict):
    """A sampler or pruner: its type and the Optuna class's keyword arguments."""

    model_config = ConfigDict(extra="allow")
    type: str


class SpaceFile(_Strict):
    objective: Objective = Objective()
    sampler: Choice = Choice(type="tpe")
    pruner: Choice = Choice(type="median")
    parameters: dict[str, Any] = Field(min_length=1)
    """Checked one by one (``_distribution``), so an error names the parameter, not a union member."""

    @field_validator("objective", mode="before")
    @classmethod
    def _metric_alone(cls, value: Any) -> Any:
        return {"metric": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Space:
    """A loaded space file: what to sample, what to optimise, and how."""

    path: str
    metric: str
    direction: Direction
    parameters: dict[str, BaseDistribution]
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """``--set`` items that apply sampled values, in the space file's order."""
        return [f"{key}={_yaml_scalar(params[key])}" for key in self.parameters if key in params]

    def describe(self) -> dict[str, Any]:
        """What identifies the search (kept in the study, compared when a driver joins it)."""
        return {
            "metric": self.metric,
            "direction": self.direction,
            "parameters": {k: optuna.distributions.distribution_to_json(d) for k, d in self.parameters.items()},
        }

    def make_sampler(self, offset: int = 0) -> optuna.samplers.BaseSampler:
        """The sampler, seeded with ``seed + offset``: a driver that restarts (or a second one)
        asks with the next seed instead of repeating the first trial's values."""
        options = {k: v for k, v in self.sampler.items() if k != "type"}
        if options.get("seed") is not None:
            options["seed"] = int(options["seed"]) + offset
        if self.sampler["type"] == "grid":
            grid = {k: d.choices for k, d in self.parameters.items() if isinstance(d, CategoricalDistribution)}
            return optuna.samplers.GridSampler(grid, **options)
        return SAMPLERS[self.sampler["type"]](**options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return PRUNERS[self.pruner["type"]](**{k: v for k, v in self.pruner.items() if k != "type"})


def _yaml_scalar(value: Any) -> str:
    """A value as the trainer's ``--set`` reads it back (YAML): ``1.0e-05`` stays a float."""
    return str(yaml.safe_dump(value, default_flow_style=True, width=10_000)).removesuffix("\n...\n").strip()


def _error(path: Path, loc: tuple[Any, ...], message: str) -> ConfigError:
    line = yaml_line(path, loc)
    where = f"{path}:{line}" if line else str(path)
    return ConfigError(f"{where}: {'.'.join(str(p) for p in loc) or '(top level)'}: {message}")


def _distribution(item: Any) -> BaseDistribution:
    if isinstance(item, list):
        if not item or not all(v is None or isinstance(v, bool | int | float | str) for v in item):
            raise ValueError("a list of choices needs at least one value, each a number, string, boolean or null")
        return CategoricalDistribution(item)
    if not isinstance(item, dict):
        raise ValueError("expected a list of choices or a range {low, high, log, step}")
    try:
        spec = Range.model_validate(item)
    except ValidationError as exc:
        # a misspelt key explains the missing one: name it first
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        name = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{name}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None
    if spec.low > spec.high:
        raise ValueError(f"low {item['low']} is above high {item['high']}")
    if spec.log and spec.low <= 0:
        raise ValueError("log: true needs low > 0")
    if spec.log and spec.step is not None:
        raise ValueError("log and step are exclusive")
    # integers when every bound the file gives is an integer (YAML `8`, not `8.0`)
    if all(isinstance(item.get(k, 1), int) and not isinstance(item.get(k), bool) for k in ("low", "high", "step")):
        return IntDistribution(int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return FloatDistribution(float(spec.low), float(spec.high), log=spec.log, step=spec.step)


def load_space(path: str | Path) -> Space:
    """Read and check a space file; ``ConfigError`` names file:line and the field."""
    path = Path(path)
    tree = read_yaml(path)
    try:
        spec = SpaceFile.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise _error(path, tuple(err["loc"]), message) from None
    parameters: dict[str, BaseDistribution] = {}
    for key, item in spec.parameters.items():
        if not _KEY.match(key):
            raise _error(path, ("parameters", key), "name a config key with its section, e.g. adapter.r")
        try:
            parameters[key] = _distribution(item)
        except ValueError as exc:
            raise _error(path, ("parameters", key), str(exc)) from None
    objective = spec.objective
    direction: Direction = objective.direction or ("maximize" if objective.metric in MAXIMISED else "minimize")
    space = Space(
        str(path),
        objective.metric,
        direction,
        parameters,
        sampler=spec.sampler.model_dump(),
        pruner=spec.pruner.model_dump(),
    )
    for section, table in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        kind = getattr(space, section)["type"]
        if kind not in table:
            raise _error(path, (section, "type"), f"{kind!r} is not one of {', '.join(table)}")
        if section == "sampler" and kind == "grid":
            ranges = [k for k, d in parameters.items() if not isinstance(d, CategoricalDistribution)]
            if ranges:
                raise _error(path, ("parameters", ranges[0]), "the grid sampler needs a list of values")
        try:
            space.make_sampler() if section == "sampler" else space.make_pruner()
        except (TypeError, ValueError) as exc:
            raise _error(path, (section,), f"{type(exc).__name__}: {exc}") from None
    return space


def space_json(space: Space) -> str:
    """``Space.describe`` as canonical JSON (stored in the study, compared on join)."""
    return json.dumps(space.describe(), sort_keys=True)
