"""`trainbus train CONFIG`: fine-tune a causal LM with a LoRA-family adapter, streaming the run.

Everything a user can get wrong (config values, labels, data, model path, output folder, the
bus) is checked before the first training step, with one clear line and a non-zero exit. Two
tasks: the risk classifier (``data.task: classify``) and chat fine-tuning (``chat``).
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed

from producers.config import RunConfig
from producers.run.arguments import training_arguments
from producers.run.callback import TrainbusCallback
from producers.run.control_inbox import ControlChannel
from producers.run.distributed import agree, init_if_launched, main_process_first, world
from producers.run.fork import Forking, announce_fork, resolve, tag
from producers.run.progress import Progress
from producers.run.publishing import open_bus
from producers.run.resume import (
    RUN_FILE,
    Resume,
    ResumeFrom,
    announce,
    check_room,
    choose_checkpoint,
    fetcher,
    next_attempt,
    read_saved,
)
from producers.task.chat import ChatDataset, Perplexity, use_chat_template
from producers.task.chatdata import parse_conversation, write_chat_sample
from producers.task.data import data_fingerprint, metadata_seen, read_examples, read_jsonl
from producers.task.encoding import EncodedDataset, EpochDraws, PadCollator
from producers.task.evaluation import ClassificationEval
from producers.task.labels import LabelSet, load_labels
from producers.task.model import (
    adapter_callbacks,
    apply_adapter,
    check_quantization,
    load_model_and_tokenizer,
    prepare_base_model,
)
from producers.task.sampledata import write_sample_data
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import console_output, get_logger, status
from runtime.publish.outbox import dead_letter_path
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import EventSink, NullSink, PublisherStats
from runtime.publish.upload import Uploader
from schemas import ForkTag, SweepTag, check_run_id

LIVE_FILE = "trainbus-live.json"


@dataclass
class Prepared:
    """What a run needs before the model loads: validated inputs and where to write."""

    cfg: RunConfig
    run_id: str
    attempt: int
    run_dir: Path
    labels: LabelSet | None
    """The classifier's label set (None for chat)."""
    train: list[Any]
    """``Example`` rows (classify) or ``Conversation`` rows (chat)."""
    validation: list[Any]
    fingerprint: str
    resume_from: Resume | None
    fork: ForkTag | None = None
    """Where a fork comes from (``--fork``): its ``run.started`` says it."""


def _read(path: str, labels: LabelSet | None, skip_invalid: bool, log: Any) -> list[Any]:
    rows: list[Any]
    if labels is None:
        rows, skipped = read_jsonl(path, parse_conversation, skip_invalid=skip_invalid)
    else:
        rows, skipped = read_examples(path, labels, skip_invalid=skip_invalid)
    if skipped:
        log.warning("skipped invalid rows", file=path, skipped=skipped, kept=len(rows))
    return rows


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"training.output_dir: cannot write checkpoints to {folder}: {exc.strerror}") from None


def prepare(
    cfg: RunConfig, *, run_id: str | None = None, resume: ResumeFrom | None = None, fork: Forking | None = None
) -> Prepared:
    """Validate config, labels, data and output folder; decide run id, attempt and checkpoint (a resumed
    run's own, or the parent's of a fork)."""
    log = get_logger()
    check_quantization(cfg.model)
    chat = cfg.data.task == "chat"
    labels = None if chat else load_labels(cfg.data.labels_file)
    train_path = Path(cfg.data.train_file)
    with main_process_first():
        if not train_path.exists() and cfg.data.generate_sample:
            (write_chat_sample if chat else write_sample_data)(train_path.parent)
            log.info("wrote the sample data set", folder=str(train_path.parent))
    train = _read(cfg.data.train_file, labels, cfg.data.skip_invalid, log)
    files = [train_path]
    validation: list[Any] = []
    if cfg.data.validation_file:
        validation = _read(cfg.data.validation_file, labels, cfg.data.skip_invalid, log)
        files.append(Path(cfg.data.validation_file))
    if cfg.data.max_eval_samples:
        validation = validation[: cfg.data.max_eval_samples]
    output = Path(cfg.training.output_dir)
    attempt, resume_from, forked = 1, None, None
    if resume:
        run_id = check_run_id(resume.run_id)
        run_dir = output / run_id
        attempt = int(agree(str(next_attempt(cfg, run_id, run_dir)) if world()[0] == 0 else None) or 0)
        resume_from = _resume_point(cfg, run_id, run_dir, resume)
        check_room(run_id, resume_from, cfg.training.max_steps)
    else:
        run_id, run_dir = _new_run(cfg, run_id, output)
        if fork is not None:
            resume_from, forked = _fork_point(cfg, fork, run_dir)
            check_room(run_id, resume_from, cfg.training.max_steps)
    _check_writable(run_dir)
    fingerprint = data_fingerprint(files)
    return Prepared(cfg, run_id, attempt, run_dir, labels, train, validation, fingerprint, resume_from, forked)


def _new_run(cfg: RunConfig, run_id: str | None, output: Path) -> tuple[str, Path]:
    try:
        run_id = check_run_id(agree(run_id or f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}") or "")
    except ValueError as exc:
        raise ConfigError(f"--run-id: {exc}") from None
    run_dir = output / run_id
    if world()[0] == 0 and (run_dir / RUN_FILE).exists():
        raise ConfigError(f"--run-id {run_id}: {run_dir} already holds a run; use --resume {run_id} to continue it")
    return run_id, run_dir


def _fork_point(cfg: RunConfig, fork: Forking, run_dir: Path) -> tuple[Resume, ForkTag]:
    """The parent's checkpoint a fork starts from (rank 0 chooses, checks and fetches it; every rank takes it)."""
    found = resolve(cfg, fork.asked, run_dir, force=fork.force)
    announce_fork(found, fork, get_logger())
    return Resume(found.path, found.event.step, found.verdict, True), tag(
        found, fork.parent, cfg.model_dump(mode="json")
    )


def _resume_point(cfg: RunConfig, run_id: str, run_dir: Path, asked: ResumeFrom) -> Resume:
    """Rank 0 chooses the checkpoint (reading the audit verdicts from the bus); every rank takes its step."""
    rank = world()[0]
    chosen = None
    if rank == 0:
        saved = read_saved(cfg, run_id)
        chosen = choose_checkpoint(
            run_id, run_dir, saved, from_step=asked.step, from_approved=asked.approved, fetch=fetcher(cfg)
        )
        announce(chosen, get_logger(run_id=run_id))
    step = int(agree(str(chosen.step) if chosen is not None else None) or 0)
    return chosen if chosen is not None else choose_checkpoint(run_id, run_dir, None, from_step=step)


def task_data(prep: Prepared, tokenizer: Any) -> tuple[Dataset[Any], Dataset[Any] | None, list[TrainerCallback]]:
    """The task's training and evaluation sets, and the callbacks that go with them: the one that
    adds the task's metrics to each evaluation (and, classify, the one that draws each epoch's prompts)."""
    d = prep.cfg.data
    if prep.labels is None:
        use_chat_template(tokenizer, d.chat_template)
        valid = ChatDataset(prep.validation, tokenizer, d.max_length) if prep.validation else None
        return ChatDataset(prep.train, tokenizer, d.max_length), valid, [Perplexity()]
    evaluator = ClassificationEval(
        prep.validation,
        tokenizer,
        prep.labels,
        d.system_prompt,
        batch_size=prep.cfg.training.per_device_eval_batch_size,
        max_length=d.max_length,
    )
    encoded = EncodedDataset(prep.validation, tokenizer, d.system_prompt, d.max_length) if prep.validation else None
    train = EncodedDataset(
        prep.train, tokenizer, d.system_prompt, d.max_length,
        metadata_dropout=d.metadata_dropout, seed=prep.cfg.training.seed,
    )  # fmt: skip
    return train, encoded, [evaluator, EpochDraws(train)]


def build_trainer(prep: Prepared, callbacks: list[TrainerCallback]) -> Trainer:
    """Model + adapter + data + ``Trainer``; ``callbacks`` are added after the task's evaluation."""
    cfg = prep.cfg
    set_seed(cfg.training.seed)
    with main_process_first():
        path = prepare_base_model(cfg.model, prep.run_dir, cfg.training.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, path)
    set_seed(cfg.training.seed)
    model = apply_adapter(model, cfg.adapter, cfg.training.max_steps)
    train_ds, eval_ds, task_callbacks = task_data(prep, tokenizer)
    args = training_arguments(cfg, prep.run_dir)
    if eval_ds is None and args.eval_strategy != "no":
        raise ConfigError("training.eval_steps: set, but data.validation_file is empty or unset")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[*adapter_callbacks(model), *task_callbacks, *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log as a Python dict; Progress shows them
    return trainer


def run_callback(
    prep: Prepared,
    sink: EventSink,
    channel: ControlChannel | None,
    sweep: SweepTag | None = None,
    group: str | None = None,
) -> TrainbusCallback:
    """The trainbus callback of a prepared run, publishing to ``sink`` (``sweep``: the trial it is; ``group``:
    the runs started with it by ``--seeds``)."""
    cfg = prep.cfg
    callback = TrainbusCallback(
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
        metadata_seen=metadata_seen(prep.train) if prep.labels is not None else {},
        fork=prep.fork,
        group=group,
    )
    if prep.resume_from is not None:  # the checkpoint's optimizer and schedule load first; then this run's values
        values = {name: getattr(cfg.training, name) for name in LIVE_NAMES}
        callback.reapply = {name: value for name, value in values.items() if value is not None}
    return callback


LIVE_NAMES = ("learning_rate", "max_grad_norm", "weight_decay", "logging_steps", "eval_steps", "save_steps")
"""What `trainbus ctl set` may change; a resumed attempt starts from the values last set."""


def _live_overrides(run_dir: Path) -> dict[str, Any]:
    path = run_dir / LIVE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _live_values(prep: Prepared, resume: ResumeFrom | None) -> dict[str, Any]:
    """A resumed attempt trains with the values an earlier one was `set` to: put into the config
    before anything reads it (``run.started``, the run file, the Trainer's arguments)."""
    live = _live_overrides(prep.run_dir) if resume else {}
    for name in LIVE_NAMES:
        if name in live:
            setattr(prep.cfg.training, name, live[name])
    return live


def _remembering(run_dir: Path, live: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """What the callback calls after each `set`: the values are written down for a later --resume."""

    def remember(effective: dict[str, Any]) -> None:
        live.update({k: v for k, v in effective.items() if k != "current_learning_rate"})
        (run_dir / LIVE_FILE).write_text(json.dumps(live))

    return remember


def _open_run(prep: Prepared, rank: int) -> tuple[EventSink, ControlChannel | None]:
    """Rank 0's bus (unless publishing is off) and control channel, and the run file a resume reads."""
    if rank != 0:
        return NullSink(), None
    cfg = prep.cfg
    channel = ControlChannel(prep.run_id)
    sink = _bus_sink(prep, cfg, channel)
    record = {"run_id": prep.run_id, "attempt": prep.attempt, "config": cfg.model_dump(mode="json")}
    (prep.run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))
    return sink, channel


def _catch_signals(callback: TrainbusCallback) -> dict[int, Any]:
    """SIGTERM and SIGINT become a stop at the next step boundary; returns the handlers to put back."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        callback.signal_name = signal.Signals(signum).name

    return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}


def _fit(prep: Prepared, callback: TrainbusCallback, others: list[TrainerCallback], log: Any) -> str:
    """Build the Trainer and train; how the run ended (``completed`` or ``stopped``). A failure ends
    the run as ``failed`` with its reason and raises a ``TrainbusError`` (one line, no traceback)."""
    try:
        trainer = build_trainer(prep, [callback, *others])
        callback.trainer = trainer
        log.info("training", run_dir=str(prep.run_dir), max_steps=prep.cfg.training.max_steps)
        trainer.train(resume_from_checkpoint=str(prep.resume_from.path) if prep.resume_from else None)
    except TrainbusError as exc:
        callback.finish("failed", reason="invalid input", error=str(exc))
        raise
    except Exception as exc:
        summary = f"{type(exc).__name__}: {exc}".splitlines()[0]
        callback.finish("failed", reason="error", error=summary)
        log.error("training failed", error=summary, traceback=traceback.format_exc(limit=5))
        raise TrainbusError(f"training failed: {summary} (run folder {prep.run_dir})") from None
    return "stopped" if callback.stop_command is not None else "completed"


def run(
    cfg: RunConfig,
    *,
    run_id: str | None = None,
    resume: ResumeFrom | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    sweep: SweepTag | None = None,
    fork: Forking | None = None,
    group: str | None = None,
) -> int:
    """Train one run end to end; returns the process exit code. ``callbacks`` run after trainbus's own;
    ``sweep`` tags ``run.started`` as a trial of a sweep."""
    init_if_launched()
    prep = prepare(cfg, run_id=run_id, resume=resume, fork=fork)
    log = get_logger(run_id=prep.run_id, attempt=prep.attempt)
    live = _live_values(prep, resume)
    rank, _ = world()
    sink, channel = _open_run(prep, rank)
    callback = run_callback(prep, sink, channel, sweep, group)
    callback.on_hyperparameters = _remembering(prep.run_dir, live)
    if isinstance(sink, PublisherSink) and cfg.publish.upload_checkpoints:
        callback.upload = Uploader(sink.target.servers, prep.run_dir / "upload.log")
    previous = _catch_signals(callback)
    others = [*callbacks] if rank else [Progress(log, terminal=console_output(cfg.log.format)), *callbacks]
    ended = "failed"
    try:
        ended = _fit(prep, callback, others, log)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        status.clear()
        stats = sink.close(timeout=cfg.publish.close_timeout)
        if rank == 0:
            print(summary_line(prep, ended, stats), flush=True)
    return 0


def _bus_sink(prep: Prepared, cfg: RunConfig, channel: ControlChannel | None) -> EventSink:
    """The run's publisher process on rank 0 (the one with a control channel) when publishing is on; else a null sink."""
    if channel is None or not cfg.publish.enabled:
        return NullSink()
    return open_bus(
        prep.run_id, cfg, prep.run_dir / "outbox.jsonl", channel,
        offline_ok=cfg.publish.offline_ok, window=cfg.publish.window_ms / 1000,
    )  # fmt: skip


def summary_line(prep: Prepared, status: str, stats: PublisherStats) -> str:
    """The run's last line: how it ended and where every event is (the bus, the outbox, set aside)."""
    outbox = prep.run_dir / "outbox.jsonl"
    line = f"trainbus: run {prep.run_id} (attempt {prep.attempt}) {status}: {stats.published} events published"
    if stats.failure:
        line += f"; the publisher failed ({stats.failure})"
    if stats.outbox_pending:
        line += f"; {stats.outbox_pending} events still in {outbox}"
    if stats.dead_lettered or stats.trimmed:
        line += f"; {stats.dead_lettered} refused by the bus, {stats.trimmed} trimmed (originals in {dead_letter_path(outbox)})"
    return line
