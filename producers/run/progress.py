"""What `trainbus train` shows while it trains: one format at a time.

On a terminal: a progress bar at the bottom (steps, loss, time left) and readable lines for
each evaluation and checkpoint above it. Without one: a JSON log line per logged step,
evaluation and checkpoint. The events on the bus are the same either way.
"""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from runtime.logs import status

BAR_WIDTH = 24
REDRAW_SECONDS = 0.25
"""The bar is redrawn at most this often: a terminal is slower than a tiny model's step."""
SHOWN_EVAL = ("loss", "perplexity", "accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost")


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def bar(step: int, total: int, loss: float | None, seconds_left: float | None) -> str:
    """``step 120/400 [#######-----------------]  30%  loss 0.412  1m05s left``."""
    done = min(1.0, step / total) if total else 0.0
    filled = int(done * BAR_WIDTH)
    text = f"step {step}/{total} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:4.0%}"
    if loss is not None:
        text += f"  loss {loss:.4g}"
    if seconds_left is not None:
        text += f"  {duration(seconds_left)} left"
    return text


class Progress(TrainerCallback):
    """The run's progress for a person (``terminal``) or as JSON log lines; see the module docstring."""

    def __init__(self, log: Any, *, terminal: bool) -> None:
        self.log = log
        self.terminal = terminal
        self.loss: float | None = None
        self._start = (time.monotonic(), 0)
        self._drawn = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = (time.monotonic(), state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self._drawn >= REDRAW_SECONDS or state.global_step >= state.max_steps:
            self._draw(state, now)

    def _draw(self, state: TrainerState, now: float) -> None:
        if not self.terminal:
            return
        self._drawn = now
        began, first = self._start
        done = state.global_step - first
        left = (now - began) / done * (state.max_steps - state.global_step) if done > 0 else None
        status.show(bar(state.global_step, state.max_steps, self.loss, left))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" not in logs:
            return
        self.loss = float(logs["loss"])
        self._draw(state, time.monotonic())
        if not self.terminal:
            fields = {k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if logs.get(k) is not None}
            self.log.info("step", step=state.global_step, max_steps=state.max_steps, **fields)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics") or {}
        shown = {name: _round(metrics[f"eval_{name}"]) for name in SHOWN_EVAL if f"eval_{name}" in metrics}
        self.log.info("evaluated", step=state.global_step, **shown)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.log.info(
            "checkpoint saved", step=state.global_step, path=f"{args.output_dir}/checkpoint-{state.global_step}"
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        status.clear()


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    return value
