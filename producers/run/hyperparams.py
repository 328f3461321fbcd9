"""Live hyper-parameter changes on a running Hugging Face Trainer, with ``TrainingArguments`` meanings.

``learning_rate`` is the schedule's peak: the scheduler's base rates are rescaled, so at every
later step the rate is what a run started with the new value would have there (setting only the
optimizer's current rate would be overwritten by the next scheduler step).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerState, TrainingArguments

from schemas import Hyperparameters


def _inner(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler


def peak_learning_rate(args: TrainingArguments, scheduler: Any) -> float:
    """The schedule's peak rate (first param group), falling back to ``args.learning_rate``."""
    base = getattr(_inner(scheduler), "base_lrs", None) if scheduler is not None else None
    return float(base[0]) if base else float(args.learning_rate)


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


def apply(
    changes: dict[str, float | int], args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Apply ``changes`` between two optimizer steps; returns the effective values."""
    effective: dict[str, Any] = {}
    if "learning_rate" in changes:
        new_peak = float(changes["learning_rate"])
        factor = new_peak / peak_learning_rate(args, scheduler)
        inner = _inner(scheduler) if scheduler is not None else None
        if inner is not None and hasattr(inner, "base_lrs"):
            inner.base_lrs = [b * factor for b in inner.base_lrs]
        for group in optimizer.param_groups:
            if "initial_lr" in group:
                group["initial_lr"] *= factor
            group["lr"] *= factor
        if inner is not None and hasattr(inner, "_last_lr"):
            inner._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
        args.learning_rate = new_peak
        effective["learning_rate"] = new_peak
        effective["current_learning_rate"] = float(optimizer.param_groups[0]["lr"])
    if "max_grad_norm" in changes:
        args.max_grad_norm = float(changes["max_grad_norm"])
        effective["max_grad_norm"] = args.max_grad_norm
    if "weight_decay" in changes:
        value = float(changes["weight_decay"])
        groups = optimizer.param_groups
        # Trainer puts decayed parameters in the first group and biases/norms (no decay) in the second
        for group in groups[:1] if len(groups) == 2 else groups:
            group["weight_decay"] = value
        args.weight_decay = value
        effective["weight_decay"] = value
    for name in ("eval_steps", "save_steps", "logging_steps"):
        if name in changes:
            value_int = int(changes[name])
            setattr(args, name, value_int)
            setattr(state, name, value_int)
            effective[name] = value_int
    return effective
