"""A recorded run for the dashboard tests, written to the real bus through the replay path.

``record_run`` publishes, through ``OutboxPublisher`` + ``Stamper`` (trainer and audit sources),
what a trainer and the audit gate would: a run that starts, trains with a loss spike and a
linear learning-rate schedule that ends at 0, is paused and resumed, gets a ``set`` (halving the
peak), evaluates, checkpoints (one approved, one rejected with reasons), is flagged, and
completes. ``publish_invalid`` puts a message on the stream that is not an event.
``record_chat_run`` writes a chat fine-tuning run, ``record_loads`` what two predictor replicas
announce, ``newer_event`` an event of a later schema version.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, Credentials
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Heartbeat,
    RunFinished,
    RunStarted,
    RunState,
    TrainStep,
)
from schemas.predict import PredictorLoaded
from schemas.subjects import CHECKPOINTS_BUCKET
from tests.publishing import OutboxPublisher

LABELS = ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK"]
SPIKE_STEP = 37
SHA = "ab" * 32


@dataclass(frozen=True)
class Recorded:
    """What ``record_run`` published, for the tests to compare with the page."""

    run_id: str
    steps: int
    eval_steps: tuple[int, ...]
    approved_step: int
    approved_checkpoint_id: str
    approved_verdict_id: str
    rejected_step: int
    rejected_reasons: tuple[str, ...]
    flag_rule: str
    set_command_id: str
    applied_set_step: int


def _loss(step: int) -> float:
    return 20.0 if step == SPIKE_STEP else 2.0 * math.exp(-step / 40) + 0.1


def record_run(
    target: BusTarget,
    settings: Settings,
    tmp: Path,
    run_id: str = "recorded",
    steps: int = 60,
    *,
    learning_rate: float = 2e-3,
    finish: bool = True,
    credentials: Credentials | None = None,
) -> Recorded:
    """Publish one whole run (see the module docstring) and wait until JetStream has it all."""
    outbox = tmp / f"{run_id}.outbox.jsonl"
    publisher = OutboxPublisher(target, settings, outbox_path=outbox, credentials=credentials)
    trainer = Stamper(publisher, run_id)
    audit = Stamper(publisher, run_id, source="audit")
    hp = {"learning_rate": learning_rate, "max_grad_norm": 1.0, "eval_steps": 30, "save_steps": 30, "logging_steps": 1}
    config = {"run_name": run_id, "training": {"learning_rate": learning_rate, "max_steps": steps, "seed": 42}}
    trainer.emit(
        RunStarted, config=config, config_hash="c0ffee" * 4, model="tiny", adapter="lora",
        data_fingerprint="d" * 16, hyperparameters=hp, max_steps=steps,
    )  # fmt: skip
    evals: list[int] = []
    checkpoints: list[Checkpoint] = []
    for step in range(1, steps + 1):
        peak = learning_rate / 2 if step > 40 else learning_rate  # the set at step 40 halves it
        trainer.emit(
            TrainStep, step=step, epoch=step / steps, loss=_loss(step), learning_rate=peak * (1 - step / steps),
            grad_norm=0.5, tokens_per_second=1000.0 + step, samples_per_second=8.0, memory_bytes=200 << 20,
        )  # fmt: skip
        if step == SPIKE_STEP:
            audit.emit(
                AuditFlag, rule="loss_spike", severity="critical", step=step, message=f"loss 20 at step {step}",
                judged_event_id=f"{run_id}.1.{trainer.seq}", value=20.0, threshold=3.0, actions=["flag", "pause_run"],
                actions_taken=["pause_run"],
            )  # fmt: skip
        if step == 40:
            trainer.emit(
                CommandResult, command_id="pause-1", command="pause", status="accepted", issued_by="alice", step=step
            )
            trainer.emit(RunState, state="paused", step=step, reason="pause by alice")
            trainer.emit(
                CommandResult, command_id="pause-1", command="pause", status="applied", issued_by="alice", step=step
            )
            trainer.emit(Heartbeat, step=step, phase="paused")
            trainer.emit(
                CommandResult, command_id="pause-2", command="pause", status="rejected", code="not_applicable",
                message="already paused", issued_by="bob", step=step,
            )  # fmt: skip
            trainer.emit(RunState, state="running", step=step, reason="resume by alice")
            trainer.emit(
                CommandResult, command_id="set-1", command="set", status="applied", issued_by="alice", step=step,
                applied={"learning_rate": learning_rate / 2, "current_learning_rate": learning_rate / 2},
            )  # fmt: skip
        if step % 30 == 0:
            evals.append(step)
            accuracy = 0.5 if step == 30 else 0.9
            trainer.emit(
                Evaluation, step=step, loss=1.0 / step, accuracy=accuracy, macro_f1=accuracy - 0.05,
                per_label_f1={label: accuracy for label in LABELS}, abstain_rate=0.1, ece=0.05,
                critical_error_cost=0.2, labels=LABELS, num_samples=16,
                confusion_matrix=[[4 if i == j else (1 if step == 30 else 0) for j in range(4)] for i in range(4)],
            )  # fmt: skip
            ckpt = trainer.emit(
                Checkpoint, step=step, path=str(tmp / f"checkpoint-{step}"), sha256=SHA, size_bytes=3 << 20,
                metrics={"accuracy": accuracy},
            )  # fmt: skip
            assert isinstance(ckpt, Checkpoint)
            checkpoints.append(ckpt)
    approved, rejected = checkpoints[-1], checkpoints[0]
    reasons = ("eval_regression: accuracy 0.5 below best", "loss_spike at step 37")
    audit.emit(
        AuditVerdict, checkpoint_event_id=rejected.event_id, checkpoint_step=rejected.step,
        checkpoint_path=rejected.path, verdict="rejected", reasons=list(reasons), metrics={"accuracy": 0.5},
    )  # fmt: skip
    approval = audit.emit(
        AuditVerdict, checkpoint_event_id=approved.event_id, checkpoint_step=approved.step,
        checkpoint_path=approved.path, verdict="approved", metrics={"accuracy": 0.9},
    )  # fmt: skip
    if finish:
        trainer.emit(RunFinished, status="completed", step=steps, reason="max_steps reached")
    stats = publisher.close(30)
    assert stats.outbox_pending == 0, stats
    return Recorded(
        run_id=run_id,
        steps=steps,
        eval_steps=tuple(evals),
        approved_step=approved.step,
        approved_checkpoint_id=approved.event_id,
        approved_verdict_id=approval.event_id,
        rejected_step=rejected.step,
        rejected_reasons=reasons,
        flag_rule="loss_spike",
        set_command_id="set-1",
        applied_set_step=40,
    )


def publish_invalid(url: str, subject: str, payload: bytes = b'{"type": "train.step", "loss": "lots"}') -> None:
    """Store a message on the events stream that is not a valid event."""
    publish_raw(url, subject, payload)


def publish_raw(url: str, subject: str, payload: bytes) -> None:
    """Store ``payload`` on ``subject`` as it is (no envelope checks, no de-duplication id)."""

    async def go() -> None:
        nc = NATS()
        await nc.connect(url)
        try:
            await nc.jetstream().publish(subject, payload)
        finally:
            await nc.close()

    asyncio.run(go())


def point_best(url: str, run_id: str, verdict_event_id: str) -> None:
    """What the audit gate does for an approved best checkpoint: ``<run>.best`` in the bucket."""

    async def go() -> None:
        nc = NATS()
        await nc.connect(url)
        try:
            kv = await nc.jetstream().create_key_value(bucket=CHECKPOINTS_BUCKET)
            await kv.put(f"{run_id}.best", json.dumps({"verdict_event_id": verdict_event_id}).encode())
        finally:
            await nc.close()

    asyncio.run(go())


def record_chat_run(target: BusTarget, settings: Settings, tmp: Path, run_id: str = "chat", steps: int = 20) -> None:
    """A chat fine-tuning run: its evaluations carry loss and perplexity, no classification fields."""
    publisher = OutboxPublisher(target, settings, outbox_path=tmp / f"{run_id}.outbox.jsonl")
    trainer = Stamper(publisher, run_id)
    config = {"run_name": run_id, "data": {"task": "chat"}, "training": {"max_steps": steps}}
    trainer.emit(
        RunStarted, config=config, config_hash="c4a7" * 6, model="tiny", adapter="lora", data_fingerprint="c" * 16,
        hyperparameters={"learning_rate": 1e-3}, max_steps=steps,
    )  # fmt: skip
    for step in range(1, steps + 1):
        trainer.emit(TrainStep, step=step, epoch=step / steps, loss=3.0 - step / steps, learning_rate=1e-3)
        if step % 10 == 0:
            loss = 2.0 - step / steps
            trainer.emit(Evaluation, step=step, loss=loss, perplexity=math.exp(loss), num_samples=8)
    trainer.emit(RunFinished, status="completed", step=steps, reason="max_steps reached")
    assert publisher.close(30).outbox_pending == 0


def record_loads(target: BusTarget, settings: Settings, tmp: Path, recorded: Recorded) -> None:
    """What `trainbus serve` publishes when two replicas load the run's approved checkpoint as ``risk``."""
    publisher = OutboxPublisher(target, settings, outbox_path=tmp / "predictor.outbox.jsonl")
    predictor = Stamper(publisher, recorded.run_id, source="predictor")
    for instance in ("replica-a", "replica-b"):
        predictor.emit(
            PredictorLoaded, alias="risk", subject="trainbus.predict.risk", step=recorded.approved_step,
            checkpoint_path=str(tmp / f"checkpoint-{recorded.approved_step}"), sha256=SHA,
            checkpoint_event_id=recorded.approved_checkpoint_id, verdict="approved", instance=instance, host="h1",
        )  # fmt: skip
    assert publisher.close(30).outbox_pending == 0


def newer_event(run_id: str, step: int) -> bytes:
    """A ``train.step`` as a later trainbus (schema_version 2) would write it."""
    event = TrainStep(
        event_id=f"{run_id}.1.{100000 + step}",
        run_id=run_id,
        seq=100000 + step,
        step=step,
        epoch=1.0,
        loss=1.0,
        learning_rate=1e-3,
    )
    return json.dumps({**json.loads(event.model_dump_json()), "schema_version": 2, "loss_kind": "new"}).encode()
