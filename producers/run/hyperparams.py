"""Live hyper-parameter changes on a running Hugging Face Trainer, with ``TrainingArguments`` meanings.

``learning_rate`` is the schedule's peak: the scheduler's base rates are rescaled, so at every
later step the rate is what a run started with the new value would have there (setting only the
optimizer's current rate would be overwritten by the next scheduler step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerState, TrainingArguments

from schemas import Hyperparameters


def _inner(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler


def peak_learning_rate(args: TrainingArguments, scheduler: Any) -> float:
    """The schedule's peak rate (first param group), falling back to ``args.learning_rate``."""
    base = getattr(_inner(scheduler), "base_lrs", None) if scheduler is not None else None
    return float(base[0]) if base else float(args.learning_rate)


def next_learning_rate(optimizer: Any) -> float:
    """The rate the next optimizer step uses (first param group): the scheduler has already moved it on."""
    return float(optimizer.param_groups[0]["lr"])


def current(args: TrainingArguments, state: TrainerState, scheduler: Any) -> Hyperparameters:
    """The live values, as reported in ``train.step`` events and ``trainbus runs``."""
    return Hyperparameters(
        learning_rate=peak_learning_rate(args, scheduler),
        max_grad_norm=float(args.max_grad_norm),
        weight_decay=float(args.weight_decay),
        eval_steps=int(state.eval_steps) if state.eval_steps and args.eval_strategy != "no" else None,
        save_steps=int(state.save_steps) if state.save_steps and args.save_strategy != "no" else None,
        logging_steps=max(1, int(state.logging_steps or args.logging_steps)),
    )


@dataclass(frozen=True)
class Live:
    """What a change acts on: the Trainer's arguments and state, its optimizer and scheduler."""

    args: TrainingArguments
    state: TrainerState
    optimizer: Any
    scheduler: Any


def _learning_rate(value: float, live: Live) -> dict[str, Any]:
    new_peak = float(value)
    factor = new_peak / peak_learning_rate(live.args, live.scheduler)
    inner = _inner(live.scheduler) if live.scheduler is not None else None
    if inner is not None and hasattr(inner, "base_lrs"):
        inner.base_lrs = [b * factor for b in inner.base_lrs]
    for group in live.optimizer.param_groups:
        if "initial_lr" in group:
            group["initial_lr"] *= factor
        group["lr"] *= factor
    if inner is not None and hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in live.optimizer.param_groups]  # what get_last_lr() reports
    live.args.learning_rate = new_peak
    return {"learning_rate": new_peak, "current_learning_rate": next_learning_rate(live.optimizer)}


def _max_grad_norm(value: float, live: Live) -> dict[str, Any]:
    live.args.max_grad_norm = float(value)
    return {"max_grad_norm": live.args.max_grad_norm}


def _weight_decay(value: float, live: Live) -> dict[str, Any]:
    groups = live.optimizer.param_groups
    # Trainer puts decayed parameters in the first group and biases/norms (no decay) in the second
    for group in groups[:1] if len(groups) == 2 else groups:
        group["weight_decay"] = float(value)
    live.args.weight_decay = float(value)
    return {"weight_decay": float(value)}


def _interval(name: str) -> Callable[[float, Live], dict[str, Any]]:
    """A setter of ``eval_steps``, ``save_steps`` or ``logging_steps``: the arguments and the state read it."""

    def set_interval(value: float, live: Live) -> dict[str, Any]:
        setattr(live.args, name, int(value))
        setattr(live.state, name, int(value))
        return {name: int(value)}

    return set_interval


SETTERS: dict[str, Callable[[float, Live], dict[str, Any]]] = {
    "learning_rate": _learning_rate,
    "max_grad_norm": _max_grad_norm,
    "weight_decay": _weight_decay,
    **{name: _interval(name) for name in ("eval_steps", "save_steps", "logging_steps")},
}
"""One setter per settable name (``schemas.commands.SETTABLE``), applied in this order."""


def apply(
    changes: dict[str, float | int], args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Apply ``changes`` between two optimizer steps; returns the effective values
    (with ``current_learning_rate``, the rate of the next step, when the peak changed)."""
    live = Live(args, state, optimizer, scheduler)
    effective: dict[str, Any] = {}
    for name, setter in SETTERS.items():
        if name in changes:
            effective.update(setter(changes[name], live))
    return effective
