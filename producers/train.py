"""`trainbus train CONFIG`: fine-tune a causal LM with a LoRA-family adapter, streaming the run.

Everything a user can get wrong (config values, labels, data, model path, output folder, the
bus) is checked before the first training step, with one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from producers.callback import TrainbusCallback, open_bus
from producers.checkpoints import latest_checkpoint
from producers.config import RunConfig
from producers.control import ControlChannel
from producers.data import Example, data_fingerprint, read_examples
from producers.distributed import agree, init_if_launched, main_process_first, world
from producers.encoding import EncodedDataset, PadCollator
from producers.evaluation import ClassificationEval
from producers.labels import LabelSet, load_labels
from producers.model import (
    adapter_callbacks,
    apply_adapter,
    check_quantization,
    load_model_and_tokenizer,
    prepare_base_model,
)
from producers.sampledata import write_sample_data
from runtime.errors import ConfigError, NotFound, TrainbusError
from runtime.logs import get_logger
from runtime.sinks import EventSink, NullSink
from schemas import SweepTag, check_run_id

RUN_FILE = "trainbus-run.json"
LIVE_FILE = "trainbus-live.json"


@dataclass
class Prepared:
    """What a run needs before the model loads: validated inputs and where to write."""

    cfg: RunConfig
    run_id: str
    attempt: int
    run_dir: Path
    labels: LabelSet
    train: list[Example]
    validation: list[Example]
    fingerprint: str
    resume_from: Path | None


def _read(path: str, labels: LabelSet, skip_invalid: bool, log: Any) -> list[Example]:
    examples, skipped = read_examples(path, labels, skip_invalid=skip_invalid)
    if skipped:
        log.warning("skipped invalid rows", file=path, skipped=skipped, kept=len(examples))
    return examples


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"training.output_dir: cannot write checkpoints to {folder}: {exc.strerror}") from None


def prepare(cfg: RunConfig, *, run_id: str | None = None, resume: str | None = None) -> Prepared:
    """Validate config, labels, data and output folder; decide run id, attempt and checkpoint."""
    log = get_logger()
    check_quantization(cfg.model)
    labels = load_labels(cfg.data.labels_file)
    train_path = Path(cfg.data.train_file)
    with main_process_first():
        if not train_path.exists() and cfg.data.generate_sample:
            write_sample_data(train_path.parent)
            log.info("wrote the sample data set", folder=str(train_path.parent))
    train = _read(cfg.data.train_file, labels, cfg.data.skip_invalid, log)
    files = [train_path]
    validation: list[Example] = []
    if cfg.data.validation_file:
        validation = _read(cfg.data.validation_file, labels, cfg.data.skip_invalid, log)
        files.append(Path(cfg.data.validation_file))
    if cfg.data.max_eval_samples:
        validation = validation[: cfg.data.max_eval_samples]
    output = Path(cfg.training.output_dir)
    attempt, resume_from = 1, None
    if resume:
        run_id = check_run_id(resume)
        run_dir = output / run_id
        previous = run_dir / RUN_FILE
        if not previous.exists():
            raise NotFound(f"--resume {run_id}: no run folder {run_dir} (looked for {previous})")
        attempt = int(json.loads(previous.read_text()).get("attempt", 1)) + 1
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise NotFound(f"--resume {run_id}: {run_dir} has no checkpoint-* folder to continue from")
    else:
        try:
            run_id = check_run_id(agree(run_id or f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}") or "")
        except ValueError as exc:
            raise ConfigError(f"--run-id: {exc}") from None
        run_dir = output / run_id
        if world()[0] == 0 and (run_dir / RUN_FILE).exists():
            raise ConfigError(f"--run-id {run_id}: {run_dir} already holds a run; use --resume {run_id} to continue it")
    _check_writable(run_dir)
    return Prepared(cfg, run_id, attempt, run_dir, labels, train, validation, data_fingerprint(files), resume_from)


def training_arguments(cfg: RunConfig, run_dir: Path) -> TrainingArguments:
    """``TrainingArguments`` from the config's ``training`` section (same names)."""
    t = cfg.training
    import torch

    if cfg.model.gradient_checkpointing:
        t.extra.setdefault("gradient_checkpointing", True)
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        bf16=t.bf16,
        fp16=t.fp16,
        optim=t.optim,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=[],
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the audit gate, not be smoothed away
        include_num_input_tokens_seen=True,
        use_cpu=not torch.cuda.is_available(),
        **t.extra,
    )


def build_trainer(prep: Prepared, callbacks: list[TrainerCallback]) -> Trainer:
    """Model + adapter + data + ``Trainer``; ``callbacks`` are added after the classification eval."""
    cfg = prep.cfg
    set_seed(cfg.training.seed)
    with main_process_first():
        path = prepare_base_model(cfg.model, prep.run_dir, cfg.training.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, path)
    set_seed(cfg.training.seed)
    model = apply_adapter(model, cfg.adapter, cfg.training.max_steps)
    d = cfg.data
    train_ds = EncodedDataset(prep.train, tokenizer, d.system_prompt, d.max_length)
    eval_ds = EncodedDataset(prep.validation, tokenizer, d.system_prompt, d.max_length) if prep.validation else None
    args = training_arguments(cfg, prep.run_dir)
    if eval_ds is None and args.eval_strategy != "no":
        raise ConfigError("training.eval_steps: set, but data.validation_file is empty or unset")
    evaluator = ClassificationEval(
        prep.validation,
        tokenizer,
        prep.labels,
        d.system_prompt,
        batch_size=cfg.training.per_device_eval_batch_size,
        max_length=d.max_length,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[*adapter_callbacks(model), evaluator, *callbacks],
    )


def run_callback(
    prep: Prepared, sink: EventSink, channel: ControlChannel | None, sweep: SweepTag | None = None
) -> TrainbusCallback:
    """The trainbus callback of a prepared run, publishing to ``sink`` (``sweep``: the trial it is)."""
    cfg = prep.cfg
    return TrainbusCallback(
        prep.run_id,
        sink=sink,
        channel=channel,
        attempt=prep.attempt,
        settings=cfg,
        heartbeat_seconds=cfg.publish.heartbeat_seconds,
        run_config=cfg.model_dump(mode="json"),
        model_name=cfg.model.name_or_path,
        adapter=cfg.adapter.method,
        data_fingerprint=prep.fingerprint,
        sweep=sweep,
    )


def _live_overrides(run_dir: Path) -> dict[str, Any]:
    path = run_dir / LIVE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run(
    cfg: RunConfig,
    *,
    run_id: str | None = None,
    resume: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    sweep: SweepTag | None = None,
) -> int:
    """Train one run end to end; returns the process exit code. ``callbacks`` run after trainbus's own;
    ``sweep`` tags ``run.started`` as a trial of a sweep."""
    init_if_launched()
    prep = prepare(cfg, run_id=run_id, resume=resume)
    log = get_logger(run_id=prep.run_id, attempt=prep.attempt)
    live = _live_overrides(prep.run_dir) if resume else {}
    for name in ("learning_rate", "max_grad_norm", "weight_decay", "logging_steps", "eval_steps", "save_steps"):
        if name in live:
            setattr(cfg.training, name, live[name])
    rank, _ = world()
    channel = ControlChannel(prep.run_id) if rank == 0 else None
    sink: EventSink = NullSink()
    if rank == 0 and cfg.publish.enabled:
        sink = open_bus(prep.run_id, cfg, prep.run_dir / "outbox.jsonl", channel, cfg.publish.memory_limit)
    if rank == 0:
        (prep.run_dir / RUN_FILE).write_text(
            json.dumps(
                {"run_id": prep.run_id, "attempt": prep.attempt, "config": cfg.model_dump(mode="json")}, indent=2
            )
        )
    callback = run_callback(prep, sink, channel, sweep)

    def remember(effective: dict[str, Any]) -> None:
        live.update({k: v for k, v in effective.items() if k != "current_learning_rate"})
        (prep.run_dir / LIVE_FILE).write_text(json.dumps(live))

    callback.on_hyperparameters = remember

    def on_signal(signum: int, frame: FrameType | None) -> None:
        callback.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = "failed"
    try:
        trainer = build_trainer(prep, [callback, *callbacks])
        callback.trainer = trainer
        log.info("training", run_dir=str(prep.run_dir), resume_from=str(prep.resume_from) if prep.resume_from else None)
        trainer.train(resume_from_checkpoint=str(prep.resume_from) if prep.resume_from else None)
        status = "stopped" if callback.stop_command is not None else "completed"
    except TrainbusError as exc:
        callback.finish("failed", reason="invalid input", error=str(exc))
        raise
    except Exception as exc:
        summary = f"{type(exc).__name__}: {exc}".splitlines()[0]
        callback.finish("failed", reason="error", error=summary)
        log.error("training failed", error=summary, traceback=traceback.format_exc(limit=5))
        raise TrainbusError(f"training failed: {summary} (run folder {prep.run_dir})") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stats = sink.close(timeout=cfg.publish.close_timeout)
        if rank == 0:
            note = (
                f"; {stats.outbox_pending} events still in {prep.run_dir / 'outbox.jsonl'}"
                if stats.outbox_pending
                else ""
            )
            print(
                f"trainbus: run {prep.run_id} (attempt {prep.attempt}) {status}: {stats.published} events published{note}",
                flush=True,
            )
    return 0
