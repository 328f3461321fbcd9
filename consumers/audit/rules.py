"""The audit gate's rules file (configs/audit.yaml): typed models, the condition each checks, loading.

Every rule has a ``severity`` and ``actions``; a rule left out of the file is off. Mistakes are
rejected at load time in one line naming the rule and the field, e.g.
``configs/audit.yaml: rules.loss_spike.factr: unknown field of rule loss_spike (fields: severity, …)``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from pydantic import Field, ValidationError, model_validator

from runtime.errors import ConfigError
from runtime.settings import Section, describe_validation_error, read_yaml
from schemas import Evaluation, TrainStep
from schemas.events import Severity

Action = Literal["flag", "reject_checkpoint", "pause_run", "stop_run"]
EvalMetric = Literal[
    "accuracy", "macro_f1", "loss", "abstain_rate", "ece", "critical_error_cost", "text_only_accuracy",
    "text_only_abstain_rate",
]  # fmt: skip
Mode = Literal["max", "min"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)


class Problem(NamedTuple):
    """Why a rule fires: a message for people, the offending value and the limit it broke."""

    message: str
    value: float | None = None
    threshold: float | None = None


Best = tuple[float, int]
"""A run's best value of the regression metric so far, and the step it was reached at."""
Check = tuple[str, str, Problem | None]
"""(rule name, episode key, problem or None when healthy) for one rule that applies to an event."""


def _flag_only() -> list[Action]:
    return ["flag"]


class Rule(Section):
    """Fields every rule has."""

    severity: Severity
    """info, warning or critical; only critical flags may pause or stop a run."""
    actions: list[Action] = Field(default_factory=_flag_only, min_length=1)
    """Every firing publishes an audit.flag; reject_checkpoint, pause_run, stop_run act on top of it."""

    @model_validator(mode="after")
    def _control_needs_critical(self) -> Rule:
        control = [a for a in self.actions if a in ("pause_run", "stop_run")]
        if control and self.severity != "critical":
            raise ValueError(f"actions: {control[0]} needs severity critical, not {self.severity}")
        if len(control) > 1:
            raise ValueError("actions: choose one of pause_run and stop_run")
        return self


class NonFinite(Rule):
    """Loss or grad norm of a train.step (or an eval's loss) is NaN or infinite."""

    def check(self, name: str, value: float | None, step: int) -> Problem | None:
        if value is None or math.isfinite(value):
            return None
        shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return Problem(f"{name} is {shown} at step {step}", value)


class LossSpike(Rule):
    """Training loss above ``factor`` x the mean of the previous ``window`` healthy losses."""

    factor: float = Field(3.0, gt=1)
    window: int = Field(10, ge=1, le=10_000)
    min_increase: float = Field(0.0, ge=0)
    """And at least this much above the mean, so tiny losses near zero do not flap."""

    def check(self, loss: float, history: deque[float], step: int) -> Problem | None:
        """Spike against ``history``; a healthy loss joins it, a spike does not (so a blow-up stays flagged)."""
        problem = None
        if len(history) >= self.window:
            mean = sum(history) / len(history)
            if loss > self.factor * mean and loss - mean > self.min_increase:
                problem = Problem(
                    f"loss rose to {loss:.3g} at step {step}, {loss / mean:.1f} times the average {mean:.3g} "
                    f"of the previous {self.window} logged losses (the limit is {self.factor:g} times)",
                    loss,
                    self.factor * mean,
                )
        if problem is None:
            history.append(loss)
            while len(history) > self.window:
                history.popleft()
        return problem


class GradNormExplosion(Rule):
    """Grad norm (before clipping) above ``threshold``."""

    threshold: float = Field(gt=0)

    def check(self, grad_norm: float, step: int) -> Problem | None:
        if grad_norm <= self.threshold:
            return None
        return Problem(
            f"grad norm reached {grad_norm:.3g} at step {step}, above the limit of {self.threshold:g}",
            grad_norm,
            self.threshold,
        )


class EvalRegression(Rule):
    """An eval's ``metric`` worse than the run's best so far by more than ``tolerance``."""

    metric: EvalMetric = "accuracy"
    mode: Mode = "max"
    """max: higher is better (accuracy); min: lower is better (loss)."""
    tolerance: float = Field(0.0, ge=0)

    def check(self, value: float, best: Best | None, step: int) -> Problem | None:
        if best is None:
            return None
        top, top_step = best
        worse = top - value if self.mode == "max" else value - top
        if worse <= self.tolerance:
            return None
        moved, side = ("fell", "below") if self.mode == "max" else ("rose", "above")
        return Problem(
            f"{self.metric} {moved} to {value:.3g} at step {step}, {worse:.3g} {side} the run's best of "
            f"{top:.3g} (at step {top_step}; tolerance {self.tolerance:g})",
            value,
            top - self.tolerance if self.mode == "max" else top + self.tolerance,
        )

    def better(self, value: float, step: int, best: Best | None) -> Best:
        """The run's best (value, step) after ``value`` at ``step``."""
        if best is None or (value > best[0] if self.mode == "max" else value < best[0]):
            return value, step
        return best


class AbstainRate(Rule):
    """Abstention rate of an eval above ``max_rate``."""

    max_rate: float | None = Field(None, ge=0, le=1)
    """Default: ``max_abstain_rate`` of the labels file (``labels_file``)."""


class CriticalErrorCost(Rule):
    """Harm-weighted critical-error cost of an eval above ``threshold``."""

    threshold: float = Field(ge=0)


class Calibration(Rule):
    """Expected calibration error (ece) of an eval above ``max_ece``."""

    max_ece: float = Field(ge=0, le=1)


class AccuracyFloor(Rule):
    """Accuracy of an eval below ``min_accuracy``."""

    min_accuracy: float = Field(ge=0, le=1)


class TextOnly(Rule):
    """Asked with the text alone (no metadata lines, as `trainbus predict "TEXT"` asks): an eval's
    accuracy below ``min_accuracy``, or its abstention rate above ``max_abstain_rate``."""

    min_accuracy: float = Field(ge=0, le=1)
    max_abstain_rate: float | None = Field(None, ge=0, le=1)
    """Default: ``max_abstain_rate`` of the labels file (``labels_file``)."""

    def check(self, event: Evaluation) -> Problem | None:
        accuracy, abstained = event.text_only_accuracy, event.text_only_abstain_rate
        if accuracy is not None and not accuracy >= self.min_accuracy:
            return Problem(
                f"asked with the text alone, accuracy was {accuracy:.3g} at step {event.step}, below the minimum "
                f"of {self.min_accuracy:g}",
                accuracy,
                self.min_accuracy,
            )
        return _above("asked with the text alone, the abstain rate", abstained, self.max_abstain_rate, event.step)


class RunStalled(Rule):
    """No heartbeat for ``seconds`` from a run that has not finished."""

    seconds: float = Field(gt=0)


def _above(name: str, value: float | None, limit: float | None, step: int) -> Problem | None:
    if value is None or limit is None or not value > limit:
        return None
    return Problem(f"{name} was {value:.3g} at step {step}, above the limit of {limit:g}", value, limit)


class Rules(Section):
    """The rules; one field per rule name (the name appears in flags and event ids)."""

    non_finite: NonFinite | None = None
    loss_spike: LossSpike | None = None
    grad_norm_explosion: GradNormExplosion | None = None
    eval_regression: EvalRegression | None = None
    abstain_rate: AbstainRate | None = None
    critical_error_cost: CriticalErrorCost | None = None
    calibration: Calibration | None = None
    accuracy_floor: AccuracyFloor | None = None
    text_only: TextOnly | None = None
    run_stalled: RunStalled | None = None

    def enabled(self) -> dict[str, Rule]:
        """Rule name -> rule, for the rules the file turns on."""
        return {name: rule for name in type(self).model_fields if (rule := getattr(self, name)) is not None}


class AuditConfig(Section):
    """The whole rules file."""

    labels_file: str = "configs/labels.yaml"
    """Where ``max_abstain_rate`` is read (relative paths from the working directory)."""
    evaluate_missing: bool = False
    """Ask a run to ``evaluate`` when a checkpoint has no evaluation yet, and judge it on that eval."""
    best_metric: EvalMetric = "accuracy"
    """The metric of the ``<run_id>.best`` pointer in the checkpoints bucket."""
    best_mode: Mode = "max"
    command_timeout: float = Field(2.0, gt=0)
    """Seconds to wait for a trainer's answer to pause/stop/evaluate."""
    rules: Rules = Rules()


def train_checks(event: TrainStep, losses: deque[float], rules: dict[str, Rule]) -> list[Check]:
    """The train.step rules that apply to ``event`` (``losses``: the loss-spike history, updated)."""
    out: list[Check] = []
    rule = rules.get("non_finite")
    if isinstance(rule, NonFinite):
        problem = rule.check("loss", event.loss, event.step) or rule.check("grad_norm", event.grad_norm, event.step)
        out.append(("non_finite", "non_finite", problem))
    rule = rules.get("loss_spike")
    if isinstance(rule, LossSpike) and math.isfinite(event.loss):
        out.append(("loss_spike", "loss_spike", rule.check(event.loss, losses, event.step)))
    rule = rules.get("grad_norm_explosion")
    if isinstance(rule, GradNormExplosion) and event.grad_norm is not None and math.isfinite(event.grad_norm):
        out.append(("grad_norm_explosion", "grad_norm_explosion", rule.check(event.grad_norm, event.step)))
    return out


def _abstain_rate(rule: AbstainRate, event: Evaluation) -> Problem | None:
    return _above("abstain rate", event.abstain_rate, rule.max_rate, event.step)


def _critical_error_cost(rule: CriticalErrorCost, event: Evaluation) -> Problem | None:
    return _above("critical error cost", event.critical_error_cost, rule.threshold, event.step)


def _calibration(rule: Calibration, event: Evaluation) -> Problem | None:
    return _above("calibration error (ece)", event.ece, rule.max_ece, event.step)


def _accuracy_floor(rule: AccuracyFloor, event: Evaluation) -> Problem | None:
    if event.accuracy is None or event.accuracy >= rule.min_accuracy:
        return None
    return Problem(
        f"accuracy was {event.accuracy:.3g} at step {event.step}, below the minimum of {rule.min_accuracy:g}",
        event.accuracy,
        rule.min_accuracy,
    )


def _text_only(rule: TextOnly, event: Evaluation) -> Problem | None:
    return rule.check(event)


EVAL_LIMITS: dict[str, tuple[str, Callable[[Any, Evaluation], Problem | None]]] = {
    "abstain_rate": ("abstain_rate", _abstain_rate),
    "critical_error_cost": ("critical_error_cost", _critical_error_cost),
    "calibration": ("ece", _calibration),
    "accuracy_floor": ("accuracy", _accuracy_floor),
    "text_only": ("text_only_accuracy", _text_only),
}
"""The eval rules that compare one metric with a limit: rule name -> (the metric an eval must carry
for the rule to apply, the check). An eval without the metric (a chat run, an older trainer) is not judged by it."""


def eval_checks(event: Evaluation, best: Best | None, rules: dict[str, Rule]) -> tuple[list[Check], Best | None]:
    """The eval rules that apply to ``event``, and the run's best regression metric after it."""
    out: list[Check] = []
    rule = rules.get("non_finite")
    if isinstance(rule, NonFinite):
        out.append(("non_finite", "non_finite.eval", rule.check("eval loss", event.loss, event.step)))
    rule = rules.get("eval_regression")
    if isinstance(rule, EvalRegression):
        value = getattr(event, rule.metric)
        if value is not None and math.isfinite(value):
            out.append(("eval_regression", "eval_regression", rule.check(value, best, event.step)))
            best = rule.better(value, event.step, best)
    for name, (metric, check) in EVAL_LIMITS.items():
        rule = rules.get(name)
        if rule is not None and getattr(event, metric) is not None:
            out.append((name, name, check(rule, event)))
    return out, best


def _rule_error(exc: ValidationError, origin: str) -> str:
    """Name the rule and field; list what is known when a name is unknown."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "rules":
        return f"{origin}: rules.{loc[1]}: unknown rule (rules: {', '.join(Rules.model_fields)})"
    if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "rules":
        known = getattr(Rules.model_fields[loc[1]].annotation, "__args__", (None,))[0]
        fields = ", ".join(known.model_fields) if known is not None else "?"
        return f"{origin}: rules.{loc[1]}.{loc[2]}: unknown field of rule {loc[1]} (fields: {fields})"
    if err["type"] == "value_error" and "ctx" in err:
        where = ".".join(loc) or "(top level)"
        return f"{origin}: {where}: {err['ctx']['error']}"
    return describe_validation_error(exc, origin)


def max_abstain_rate(labels_file: Path) -> float:
    """``max_abstain_rate`` of the labels file (read here: consumers never import the trainer)."""
    value = read_yaml(labels_file).get("max_abstain_rate")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{labels_file}: max_abstain_rate: expected a number between 0 and 1, got {value!r}")
    return float(value)


def load_rules(path: str | Path) -> AuditConfig:
    """Read and validate a rules file; ``ConfigError`` (exit 2) names the failing rule and field."""
    origin = str(path)
    try:
        config = AuditConfig.model_validate(read_yaml(Path(path)))
    except ValidationError as exc:
        raise ConfigError(_rule_error(exc, origin)) from None
    # the abstention limits a rule leaves out are the labels file's max_abstain_rate
    unset = [
        (rule, name)
        for rule, name in ((config.rules.abstain_rate, "max_rate"), (config.rules.text_only, "max_abstain_rate"))
        if rule is not None and getattr(rule, name) is None
    ]
    if unset:
        rate = max_abstain_rate(_labels_file(config, Path(path)))
        for rule, name in unset:
            setattr(rule, name, rate)
    return config


def _labels_file(config: AuditConfig, rules_file: Path) -> Path:
    labels = Path(config.labels_file)
    if not labels.is_absolute() and not labels.exists():
        labels = rules_file.resolve().parent.parent / labels  # relative to the project the rules live in
    return labels
