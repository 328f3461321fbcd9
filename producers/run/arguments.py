"""The run config's ``training`` section as ``transformers.TrainingArguments``, and its check.

``training`` keys are ``TrainingArguments`` names: the declared fields of ``TrainingConfig``
carry trainbus's defaults, and any other ``TrainingArguments`` field may be written beside them
(``TrainingConfig`` refuses a name ``TrainingArguments`` does not have, or a value of the wrong
type). ``check_training`` then judges the whole section with ``TrainingArguments`` itself before
anything loads — what its own ``__post_init__`` refuses, and a ``report_to`` integration that is
not installed — through ``runtime.settings.load_config(check=…)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from producers.config import RunConfig
from runtime.settings import Problem


def training_arguments(cfg: RunConfig, run_dir: Path) -> TrainingArguments:
    """``TrainingArguments`` from the config's ``training`` section (same names).

    trainbus's choices (no tqdm: ``trainbus train`` draws its own progress; NaN losses reach the
    audit gate unsmoothed; no reporting integration) come first, so a key the config sets wins.
    """
    import torch

    t = cfg.training
    chosen: dict[str, Any] = {
        "max_steps": t.max_steps,
        "num_train_epochs": t.num_train_epochs,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "logging_strategy": "steps",
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps or 500,
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "bf16": t.bf16,
        "fp16": t.fp16,
        "optim": t.optim,
        "dataloader_num_workers": t.dataloader_num_workers,
        "report_to": [],
        "disable_tqdm": True,
        "logging_nan_inf_filter": False,  # a NaN loss must reach the audit gate, not be smoothed away
        "include_num_input_tokens_seen": True,
        "use_cpu": not torch.cuda.is_available(),
    }
    if cfg.model.gradient_checkpointing:
        chosen["gradient_checkpointing"] = True
    return TrainingArguments(output_dir=str(run_dir), **{**chosen, **t.arguments()})


def check_training(cfg: RunConfig) -> list[Problem]:
    """What ``TrainingArguments`` itself refuses in ``cfg.training`` (names and types are checked
    by ``TrainingConfig``), and ``report_to`` integrations that are not installed."""
    try:
        args = training_arguments(cfg, Path(cfg.training.output_dir))
    except (ValueError, TypeError, NotImplementedError, ImportError) as exc:
        return [(("training",), f"TrainingArguments refused these settings: {_one_line(exc)}")]
    return _missing_integrations(list(args.report_to or []))


def _missing_integrations(report_to: list[str]) -> list[Problem]:
    """``report_to`` names transformers does not know, or whose package is not installed."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    problems: list[Problem] = []
    for name in report_to:
        callback = INTEGRATION_TO_CALLBACK.get(name)
        if callback is None:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            problems.append((("training", "report_to"), f"{name!r} is not a reporting integration (known: {known})"))
            continue
        try:
            callback()  # each integration's callback checks at creation that its package is importable
        except (RuntimeError, ImportError) as exc:
            problems.append((("training", "report_to"), f"{name}: {_one_line(exc)} (pip install {name})"))
    return problems


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
