"""The risk classifier's label set: label names, harm weights, critical confusions, abstention.

Loaded once per run from ``configs/labels.yaml`` (``load_labels``); evaluation uses it to price
mistakes (``LabelSet.confusion_cost``) and to decide when an answer abstains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from runtime.errors import ConfigError
from runtime.settings import Loc, Section, describe_validation_error, read_yaml, yaml_line


class LabelReferenceError(ValueError):
    """A label set that is well-formed field by field but inconsistent; ``loc`` is the field."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


class LabelSpec(Section):
    """One label the classifier can answer."""

    name: str = Field(min_length=1)
    harm_weight: float = Field(ge=0, allow_inf_nan=False)
    """Cost of missing this label (answering another one) when no critical confusion applies."""


class CriticalConfusion(Section):
    """A (true, predicted) pair that costs ``weight`` instead of the true label's harm weight."""

    true: str
    predicted: str
    weight: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_true_key(cls, data: Any) -> Any:
        # YAML 1.1 reads an unquoted ``true:`` key as the boolean True.
        if isinstance(data, dict) and True in data and "true" not in data:
            data = {("true" if key is True else key): value for key, value in data.items()}
        return data


class LabelSet(Section):
    """The labels in answer order, what each mistake costs, and when to abstain."""

    labels: list[LabelSpec] = Field(min_length=2)
    critical_confusions: list[CriticalConfusion] = Field(default_factory=list)
    abstain_threshold: float = Field(gt=0, le=1)
    """Abstain when the chosen label's probability is below this."""
    max_abstain_rate: float = Field(ge=0, le=1)
    """The audit gate flags an evaluation that abstains more often than this."""

    @model_validator(mode="after")
    def _consistent(self) -> LabelSet:
        seen: set[str] = set()
        for i, spec in enumerate(self.labels):
            if spec.name in seen:
                raise LabelReferenceError(("labels", i, "name"), f"duplicate label {spec.name!r}")
            seen.add(spec.name)
        known = ", ".join(self.names)
        pairs: set[tuple[str, str]] = set()
        for i, item in enumerate(self.critical_confusions):
            for field, value in (("true", item.true), ("predicted", item.predicted)):
                if value not in seen:
                    loc: Loc = ("critical_confusions", i, field)
                    raise LabelReferenceError(loc, f"unknown label {value!r} (labels: {known})")
            if item.true == item.predicted:
                raise LabelReferenceError(
                    ("critical_confusions", i), f"true and predicted are both {item.true!r}; a correct answer costs 0"
                )
            if (item.true, item.predicted) in pairs:
                raise LabelReferenceError(
                    ("critical_confusions", i), f"pair {item.true} -> {item.predicted} is listed twice"
                )
            pairs.add((item.true, item.predicted))
        return self

    @property
    def names(self) -> list[str]:
        """Label names in answer order (the order of probability columns)."""
        return [spec.name for spec in self.labels]

    def index(self, name: str) -> int:
        """Position of ``name`` in ``names``; ``KeyError`` for an unknown label."""
        for i, spec in enumerate(self.labels):
            if spec.name == name:
                return i
        raise KeyError(f"unknown label {name!r} (labels: {', '.join(self.names)})")

    def harm_weight(self, name: str) -> float:
        """Cost of missing label ``name``."""
        return self.labels[self.index(name)].harm_weight

    def confusion_cost(self, true: str, predicted: str) -> float:
        """Cost of answering ``predicted`` when the answer is ``true``.

        0 for a correct answer, the critical-confusion weight when the pair is listed, otherwise
        the true label's harm weight.
        """
        self.index(predicted)  # an unknown prediction is a bug, not a free mistake
        if true == predicted:
            return 0.0
        for item in self.critical_confusions:
            if item.true == true and item.predicted == predicted:
                return item.weight
        return self.harm_weight(true)


def load_labels(path: str | Path) -> LabelSet:
    """Load and check a label file; any problem is a one-line ``ConfigError`` naming file:line and field."""
    path = Path(path)
    data = read_yaml(path)
    try:
        return LabelSet.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        ref = first.get("ctx", {}).get("error")
        loc: Loc = ref.loc if isinstance(ref, LabelReferenceError) else tuple(first["loc"])
        line = yaml_line(path, loc)
        origin = f"{path}:{line}" if line is not None else str(path)
        if isinstance(ref, LabelReferenceError):
            raise ConfigError(f"{origin}: {'.'.join(str(p) for p in loc)}: {ref}") from None
        raise ConfigError(describe_validation_error(exc, origin)) from None
