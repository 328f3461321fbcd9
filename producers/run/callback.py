"""``TrainbusCallback``: publishes a Hugging Face ``Trainer`` run as trainbus events and obeys commands.

Add it to any ``transformers.Trainer`` or TRL ``SFTTrainer``::

    from producers import TrainbusCallback
    TrainbusCallback.attach(trainer, run_id="my-run")   # or Trainer(..., callbacks=[TrainbusCallback()])

It never blocks on the network: events go to the run's outbox file and a publisher process of its
own sends them (``producers.run.publishing``), and it never stops training because the bus is down: it
then starts offline (events wait in the outbox, the connection is retried in the background).
Commands received on ``trainbus.control.<run_id>`` are applied at the next step boundary on every rank. Only rank 0
publishes. However the run ends — completed, a crash in ``train()``, interpreter exit, SIGTERM —
it publishes ``run.finished`` and flushes (see ``producers.run.exits``); every command accepted but
not applied by then is answered ``rejected`` (``finished``). A checkpoint, once announced, is never
written again: a second save at its step points to it, and ``stop`` without save saves nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.run import hyperparams
from producers.run.control_inbox import ControlChannel, internal_stop, result_fields
from producers.run.distributed import release_command_group, share_commands, world
from producers.run.exits import ExitGuard, wrap_train
from producers.run.fencing import launch_tag
from producers.run.publishing import open_bus
from runtime.checkpoints import fingerprint
from runtime.publish.sinks import EventSink, NullSink, Stamper
from runtime.publish.upload import Uploader
from runtime.settings import Settings
from schemas import (
    Checkpoint,
    Command,
    CommandReply,
    CommandResult,
    Evaluation,
    ForkTag,
    Heartbeat,
    RunFinished,
    RunStarted,
    RunState,
    Stop,
    SweepTag,
    TrainStep,
)

_EVAL_FIELDS = (
    "accuracy",
    "macro_f1",
    "per_label_f1",
    "abstain_rate",
    "ece",
    "critical_error_cost",
    "labels",
    "confusion_matrix",
    "num_samples",
    "num_abstained",
    "perplexity",
    "text_only_accuracy",
    "text_only_abstain_rate",
)


@dataclass(frozen=True)
class Boundary:
    """The step boundary a command is applied at: what the Trainer's hooks pass."""

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    kwargs: dict[str, Any]

    @property
    def step(self) -> int:
        return self.state.global_step


def _finite(value: Any) -> float:
    return float(value) if value is not None else math.nan


@functools.lru_cache(maxsize=1)
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)  # costs a /proc read: one per process, not one per log step


def _memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(_process(os.getpid()).memory_info().rss)


class TrainbusCallback(TrainerCallback):
    """See the module docstring. ``sink``/``channel`` are given by ``trainbus train``; else it connects itself."""

    def __init__(
        self,
        run_id: str | None = None,
        *,
        sink: EventSink | None = None,
        channel: ControlChannel | None = None,
        attempt: int = 1,
        settings: Settings | None = None,
        heartbeat_seconds: float = 2.0,
        run_config: dict[str, Any] | None = None,
        model_name: str | None = None,
        adapter: str | None = None,
        data_fingerprint: str = "",
        outbox_dir: Path | None = None,
        sweep: SweepTag | None = None,
        metadata_seen: dict[str, list[str]] | None = None,
        fork: ForkTag | None = None,
        group: str | None = None,
    ) -> None:
        self.run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.rank, self.world_size = world()
        self.settings = settings or Settings()
        self.channel = channel
        self._own_sink = sink is None
        self.stamper = Stamper(sink or NullSink(), self.run_id, attempt)
        self.heartbeat_seconds = heartbeat_seconds
        self.run_config = run_config
        self.model_name = model_name
        self.adapter = adapter
        self.data_fingerprint = data_fingerprint
        self.outbox_dir = outbox_dir
        self.sweep = sweep
        self.metadata_seen = metadata_seen or {}
        self.fork = fork
        self.group = group
        self.trainer: Trainer | None = None
        self.phase = "starting"
        self.paused = False
        self.stop_command: Command | None = None
        self.finished = False
        self.signal_name: str | None = None
        self.latest_eval: dict[str, float] = {}
        self._pending_trigger: dict[str, str] = {}
        self._deferred: list[Command] = []
        self._t0 = time.monotonic()
        self._last_log = (time.monotonic(), 0, 0)
        self._not_training = 0.0  # seconds since the last log spent paused, evaluating or saving
        self._mark = time.monotonic()  # the end of the last thing that was not training
        self._in_pause = False
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._step = 0
        self._saved: dict[int, tuple[str, str]] = {}
        """Steps saved in this attempt: (path, sha256) of the checkpoint announced there (sha256 on rank 0 only)."""
        self._rate_set_at: int | None = None  # the step whose boundary last applied a new learning rate
        self._exit_guard = ExitGuard(self._ended)
        if channel is not None:
            channel.on_reply = self._on_reply

    @classmethod
    def attach(cls, trainer: Trainer, **kwargs: Any) -> TrainbusCallback:
        """Create the callback, add it to ``trainer`` and bind it (so save/evaluate work while paused);
        an exception out of ``trainer.train()`` then ends the run as ``failed`` with the error."""
        callback = cls(**kwargs)
        callback.trainer = trainer
        trainer.add_callback(callback)
        wrap_train(trainer, callback._exit_guard.crashed)
        return callback

    @property
    def is_publisher(self) -> bool:
        return self.rank == 0

    def _open_own_bus(self, args: TrainingArguments) -> None:
        """Someone's own script: the callback opens the bus itself; a bus that is down must not stop training."""
        self.channel = self.channel or ControlChannel(self.run_id, self._on_reply)
        outbox = (self.outbox_dir or Path(str(args.output_dir))) / f"outbox-{self.run_id}.jsonl"
        sink = open_bus(self.run_id, self.settings, outbox, self.channel, offline_ok=True)
        self.stamper = Stamper(sink, self.run_id, self.stamper.attempt)
        self.upload = self.upload or Uploader(sink.target.servers, outbox.with_name(f"upload-{self.run_id}.log"))
        self._exit_guard.arm()

    def emit(self, cls: type[Any], **fields: Any) -> None:
        if self.is_publisher:
            self.stamper.emit(cls, **fields)

    # ---- lifecycle -----------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.is_publisher and self._own_sink and isinstance(self.stamper.sink, NullSink):
            self._open_own_bus(args)
        if self.reapply:  # a resume or a fork: the checkpoint's optimizer and schedule loaded, now this run's values
            hyperparams.apply(self.reapply, args, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        model = kwargs.get("model")
        config = self.run_config if self.run_config is not None else args.to_sanitized_dict()
        config_json = json.dumps(config, sort_keys=True, default=str)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else None
        total = sum(p.numel() for p in model.parameters()) if model is not None else None
        name = self.model_name or str(
            getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        )
        peft_type = getattr(getattr(model, "peft_config", {}).get("default"), "peft_type", None)
        self._step = state.global_step
        self.emit(
            RunStarted,
            config=json.loads(config_json),
            config_hash=hashlib.sha256(config_json.encode()).hexdigest(),
            model=name,
            adapter=self.adapter or (str(peft_type.value).lower() if peft_type is not None else "none"),
            data_fingerprint=self.data_fingerprint,
            world_size=self.world_size,
            hyperparameters=hyperparams.current(args, state, kwargs.get("lr_scheduler")),
            max_steps=state.max_steps or None,
            trainable_parameters=trainable,
            total_parameters=total,
            resumed_from_step=state.global_step or None,
            host=socket.gethostname(),
            sweep=self.sweep,
            fork=self.fork,
            group=self.group,
            launch=launch_tag(os.environ),
            metadata_seen=self.metadata_seen,
        )
        self.phase = "training"
        self._last_log = (time.monotonic(), state.global_step, state.num_input_tokens_seen or 0)
        self._mark, self._not_training = self._last_log[0], 0.0
        if self.is_publisher and self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="trainbus-heartbeat", daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self.heartbeat_seconds):
            self.emit(Heartbeat, step=self._step, phase=self.phase, uptime_seconds=time.monotonic() - self._t0)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        release_command_group()  # every rank ends here together; no gloo side group may outlive the run
        if self.stop_command is not None:
            self.finish(
                "stopped",
                state.global_step,
                reason=self.stop_command.reason or f"stop by {self.stop_command.issued_by}",
            )
        else:
            self.finish("completed", state.global_step, reason="max_steps reached")

    def _ended(self, reason: str, error: str | None) -> None:
        self.finish("failed", reason=reason, error=error)

    def finish(self, status: str, step: int | None = None, *, reason: str = "", error: str | None = None) -> None:
        """Publish ``run.finished`` once, after answering every unapplied command and stopping the heartbeat,
        then flush the bus (when this callback owns it). Nothing of this attempt is published after it."""
        if self.finished:
            return
        self.finished = True
        self._exit_guard.disarm()
        self._heartbeat_stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        step = self._step if step is None else step
        for command in self.channel.close() if self.channel is not None else []:
            self.emit(
                CommandResult, command_id=command.command_id, command=command.type, status="rejected",
                code="finished", message=f"the run ended ({status}) before it was applied", issued_by=command.issued_by,
                step=step,
            )  # fmt: skip
        if self.is_publisher:
            self.stamper.emit_last(
                RunFinished, status=status, step=step, reason=reason[:2000], error=error[:2000] if error else None
            )
        if self._own_sink:
            self.stamper.sink.close()

    # ---- metrics -------------------------------------------------------------------------

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" not in logs:
            return
        now = time.monotonic()
        then, last_step, last_tokens = self._last_log
        steps = max(1, state.global_step - last_step)
        # rates count training time only: a pause, an evaluation or a save in between is not throughput
        dt = max(now - then - self._not_training, 1e-9)
        self._not_training, self._mark = 0.0, now
        tokens = state.num_input_tokens_seen or 0
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world_size
        self._last_log = (now, state.global_step, tokens)
        learning_rate = logs.get("learning_rate")
        if self._rate_set_at == state.global_step and kwargs.get("optimizer") is not None:
            # the Trainer read the rate before a `set` at this boundary rescaled it: report what the next step uses
            learning_rate = hyperparams.next_learning_rate(kwargs["optimizer"])
        self.emit(
            TrainStep,
            step=state.global_step,
            epoch=_finite(state.epoch),
            loss=_finite(logs.get("loss")),
            learning_rate=_finite(learning_rate),
            grad_norm=_finite(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            tokens_per_second=(tokens - last_tokens) / dt if tokens else 0.0,
            samples_per_second=samples / dt,
            step_time_seconds=dt / steps,
            memory_bytes=_memory_bytes(),
            hyperparameters=hyperparams.current(args, state, kwargs.get("lr_scheduler")),
        )

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.phase = "evaluating"

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._off_training()
        metrics: dict[str, Any] = kwargs.get("metrics") or {}
        found = {name: metrics[f"eval_{name}"] for name in _EVAL_FIELDS if f"eval_{name}" in metrics}
        self.latest_eval = {k: float(v) for k, v in found.items() if isinstance(v, int | float)}
        self.latest_eval["loss"] = _finite(metrics.get("eval_loss"))
        self.emit(
            Evaluation,
            step=state.global_step,
            epoch=_finite(state.epoch),
            loss=_finite(metrics.get("eval_loss")),
            trigger=self._pending_trigger.pop("evaluate", "scheduled"),
            **found,
        )
        self.phase = "paused" if self.paused else "training"

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._off_training()
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        self._saved[state.global_step] = (str(folder), "")  # every rank: they all skip a second save alike
        if not self.is_publisher or not folder.is_dir():
            return
        digest, size = fingerprint(folder)
        self._saved[state.global_step] = (str(folder), digest)
        trigger = self._pending_trigger.pop("save", "scheduled")
        metrics = dict(self.latest_eval)
        self.emit(
            Checkpoint,
            step=state.global_step,
            path=str(folder),
            sha256=digest,
            size_bytes=size,
            metrics=metrics,
            trigger=trigger,
        )
        if self.upload is not None:  # the checkpoint to the bus's object store, by a process of its own
            self.upload(self.run_id, state.global_step, digest, folder)

    # ---- control -------------------------------------------------------------------------

    def _on_reply(self, command: Command | None, reply: CommandReply) -> None:
        self.emit(CommandResult, **result_fields(command, reply))

    def _take(self, timeout: float = 0.0, *, step: int | None = None) -> list[Command]:
        """Commands to apply on every rank; with ``step``, the boundary after it was just reached."""
        if self.signal_name and self.stop_command is None and self.channel is not None:
            self.channel.submit(
                internal_stop(self.run_id, f"received {self.signal_name}", f"signal-{uuid.uuid4().hex[:8]}")
            )
            self.signal_name = None
        local: list[Command] = []
        if self.channel is not None and self.is_publisher:  # rank 0 takes the commands; every rank applies them
            local = self.channel.arrive(step) if step is not None else self.channel.take(timeout)
        elif self.channel is not None and step is not None:
            self.channel.step = step
        return share_commands(local)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step = state.global_step
        paused_at, self._in_pause = time.monotonic(), True  # a save or eval applied here is pause time
        for command in self._take(step=state.global_step):
            self._apply(command, args, state, control, kwargs)
        while self.paused and self.stop_command is None:
            for command in self._take(timeout=0.2):
                self._apply(command, args, state, control, kwargs)
        self._in_pause = False
        self._mark = time.monotonic()
        self._not_training += self._mark - paused_at
        self._no_second_save(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._no_second_save(state, control)  # the Trainer saves once more after its loop ends

    def _no_second_save(self, state: TrainerState, control: TrainerControl) -> None:
        """Cancel the save the Trainer is about to make when this step was saved already (a checkpoint,
        once announced, is never rewritten: its sha256 would no longer hold) or after ``stop --no-save``
        (which saves nothing, even at a ``save_steps`` boundary)."""
        no_save = isinstance(self.stop_command, Stop) and not self.stop_command.save
        if control.should_save and (no_save or state.global_step in self._saved):
            control.should_save = False
            self._pending_trigger.pop("save", None)

    def _off_training(self) -> None:
        """An evaluation or a save just ended: the time since the last mark was not training
        (unless it happened while paused, which the pause already counts)."""
        if not self._in_pause:
            now = time.monotonic()
            self._not_training += now - self._mark
            self._mark = now

    def _applied(self, command: Command, step: int, applied: dict[str, Any] | None = None) -> None:
        self.emit(
            CommandResult,
            command_id=command.command_id,
            command=command.type,
            status="applied",
            issued_by=command.issued_by,
            step=step,
            applied=applied or {},
        )

    def _apply(
        self,
        command: Command,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
    ) -> None:
        applied = self._HANDLERS[command.type](self, command, Boundary(args, state, control, kwargs))
        self._applied(command, state.global_step, applied)

    def _pause(self, command: Command, at: Boundary) -> None:
        self.paused, self.phase = True, "paused"
        self.emit(RunState, state="paused", step=at.step, reason=command.reason or f"pause by {command.issued_by}")

    def _resume(self, command: Command, at: Boundary) -> None:
        self.paused, self.phase = False, "training"
        self.emit(RunState, state="running", step=at.step, reason=command.reason or f"resume by {command.issued_by}")

    def _stop(self, command: Command, at: Boundary) -> None:
        self.stop_command, self.paused, self.phase = command, False, "stopping"
        at.control.should_training_stop = True
        if command.save:  # type: ignore[union-attr]
            at.control.should_save = True
            self._pending_trigger["save"] = "signal" if command.issued_by == "trainbus" else "command"
        self.emit(RunState, state="stopping", step=at.step, reason=command.reason or f"stop by {command.issued_by}")

    def _save(self, command: Command, at: Boundary) -> dict[str, Any] | None:
        """``save_checkpoint``: at once while paused (training will not reach the Trainer's save), else at
        this step boundary. A step saved already is not saved again: the result points to its checkpoint."""
        if at.step in self._saved:
            path, sha256 = self._saved[at.step]
            return {"checkpoint": path, "sha256": sha256, "already_saved": True}
        self._pending_trigger["save"] = "command"
        if self.paused and self.trainer is not None:
            self.phase = "saving"
            self.trainer._save_checkpoint(self.trainer.model, trial=None)  # type: ignore[arg-type]
            self.on_save(at.args, at.state, at.control)
            self.phase = "paused"
        else:
            at.control.should_save = True
        return None

    def _evaluate(self, command: Command, at: Boundary) -> None:
        self._pending_trigger["evaluate"] = "command"
        if self.paused and self.trainer is not None:
            self.trainer.evaluate()
        else:
            at.control.should_evaluate = True

    def _set(self, command: Command, at: Boundary) -> dict[str, Any]:
        changes = command.changes()  # type: ignore[union-attr]
        optimizer, scheduler = at.kwargs.get("optimizer"), at.kwargs.get("lr_scheduler")
        effective = hyperparams.apply(changes, at.args, at.state, optimizer, scheduler)
        if "learning_rate" in effective:
            self._rate_set_at = at.step
        if self.on_hyperparameters is not None:
            self.on_hyperparameters(effective)
        return effective

    _HANDLERS: ClassVar[dict[str, Callable[[TrainbusCallback, Command, Boundary], dict[str, Any] | None]]] = {
        "pause": _pause,
        "resume": _resume,
        "stop": _stop,
        "save_checkpoint": _save,
        "evaluate": _evaluate,
        "set": _set,
    }
    """What each command does at a step boundary; the dict returned (``set``) goes into its ``applied`` result."""

    on_hyperparameters: Any = None
    """Called with the effective values after ``set`` (``trainbus train`` persists them for --resume)."""
    reapply: dict[str, Any] | None = None
    """Live hyper-parameters to set once the Trainer has loaded a checkpoint's optimizer and schedule
    (a resume or a fork whose values differ from the checkpoint's)."""
    upload: Callable[[str, int, str, Path], None] | None = None
    """Called with (run, step, sha256, folder) after each checkpoint is announced: puts it in the bus's
    object store (``runtime.publish.upload.Uploader``), so a resume or a predictor elsewhere can fetch it."""
