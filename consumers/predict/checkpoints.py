"""Which checkpoint may be served, read from the bus: the audit gate's ``best`` pointer, the
``checkpoint`` event that vouches for its files, its verdict, and the config it was trained with.

Nothing here loads a model. ``choose`` refuses a rejected or unjudged checkpoint unless forced;
``verify`` compares the files on disk with the sha256 the trainer published when it saved them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from consumers.predict.waiting import RunProgress
from producers.config import RunConfig
from runtime.bus.objects import fetch
from runtime.bus.stream import last_event, replay
from runtime.checkpoints import changed_since_announced, fingerprint
from runtime.errors import ConfigError, NotFound, TrainbusError
from runtime.settings import describe_validation_error
from schemas import AuditVerdict, Checkpoint, RunFinished, RunStarted, TrainStep
from schemas.subjects import CHECKPOINT_FILES_BUCKET, CHECKPOINTS_BUCKET, event_subject

Verdict = Literal["approved", "rejected", "pending"]


class Refused(TrainbusError):
    """A checkpoint that may not be served or exported: rejected, unjudged, or not what was saved."""

    exit_code = 2


@dataclass(frozen=True)
class Chosen:
    """A checkpoint picked for serving, with what vouches for it."""

    run_id: str
    step: int
    path: Path
    sha256: str
    """What the ``checkpoint`` event says the folder hashes to (computed from disk when forced without one)."""
    verdict: Verdict
    forced: bool
    config: RunConfig
    """The run's config as its ``run.started`` event recorded it (model, prompt, labels file)."""
    attempt: int = 1
    event_id: str | None = None
    metadata_seen: dict[str, list[str]] = field(default_factory=dict)
    """The metadata keys and values the run trained with (its ``run.started``)."""


def best_key(run_id: str) -> str:
    """The bucket key of a run's best approved checkpoint, as the audit gate writes it."""
    return f"{run_id}.best"


async def open_bucket(js: JetStreamContext) -> KeyValue | None:
    """The audit gate's checkpoint bucket, or None while no audit gate has created it."""
    try:
        return await js.key_value(CHECKPOINTS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return None


def parse_best(value: bytes | None) -> dict[str, Any] | None:
    """A ``<run>.best`` entry (JSON written by the audit gate), or None for a deleted or unreadable one."""
    try:
        entry = json.loads(value or b"")
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and "checkpoint_event_id" in entry else None


async def _events(js: JetStreamContext, run_id: str, event_type: str) -> list[Any]:
    try:
        return [item.event async for item in replay(js, event_subject(run_id, event_type)) if item.event is not None]
    except nats.js.errors.NotFoundError:
        return []  # no stream yet: no run either


async def choose(
    js: JetStreamContext,
    run_id: str,
    *,
    best: dict[str, Any] | None = None,
    step: int | None = None,
    path: str | None = None,
    force: bool = False,
) -> Chosen:
    """The checkpoint to serve: the ``best`` entry's, else the one at ``step`` or ``path``.

    Raises ``NotFound`` when the run or checkpoint has no event, ``Refused`` when its verdict is
    not ``approved`` and ``force`` is False.
    """
    checkpoints: list[Checkpoint] = await _events(js, run_id, "checkpoint")
    if best is not None:
        wanted = [c for c in checkpoints if c.event_id == best["checkpoint_event_id"]]
        what = f"checkpoint event {best['checkpoint_event_id']} (the bucket's {best_key(run_id)})"
    elif step is not None:
        wanted = [c for c in checkpoints if c.step == step]
        what = f"checkpoint at step {step}"
    elif path is not None:
        wanted = [c for c in checkpoints if Path(c.path).resolve() == Path(path).resolve()]
        what = f"checkpoint {path}"
    else:
        raise ConfigError("choose a checkpoint: the best one, --step or --checkpoint")
    started: list[RunStarted] = await _events(js, run_id, "run.started")
    if not started:
        raise NotFound(f"run {run_id!r} has no run.started event in the stream: nothing to serve")
    if not wanted:
        if path is None or not force:
            steps = ", ".join(str(c.step) for c in checkpoints) or "none"
            raise NotFound(f"run {run_id}: no {what} in the stream (checkpoints at steps: {steps})")
        # --force on a folder no event vouches for: serve it as is, verdict unknown
        last = started[-1]
        return Chosen(
            run_id, _step_of(path), Path(path), _sha_of(Path(path)), "pending", True, _config(last),
            metadata_seen=last.metadata_seen,
        )  # fmt: skip
    ckpt = wanted[-1]  # a resumed run saves the same step again: the newest attempt wins
    verdicts: list[AuditVerdict] = await _events(js, run_id, "audit.verdict")
    verdict: Verdict = next((v.verdict for v in verdicts if v.checkpoint_event_id == ckpt.event_id), "pending")
    if verdict != "approved" and not force:
        why = "the audit gate rejected it" if verdict == "rejected" else "the audit gate has not judged it"
        raise Refused(f"run {run_id}: {what} (step {ckpt.step}) is {verdict}: {why}; --force serves it anyway")
    config = next((s for s in reversed(started) if s.attempt == ckpt.attempt), started[-1])
    return Chosen(
        run_id,
        ckpt.step,
        Path(ckpt.path),
        ckpt.sha256,
        verdict,
        verdict != "approved",
        _config(config),
        ckpt.attempt,
        ckpt.event_id,
        config.metadata_seen,
    )


async def run_progress(js: JetStreamContext, run_id: str) -> RunProgress:
    """Where the run stands for a predictor waiting on it: started, finished, its step, and the
    verdict on each step's newest checkpoint."""
    started: list[RunStarted] = await _events(js, run_id, "run.started")
    finished: list[RunFinished] = await _events(js, run_id, "run.finished")
    newest = {c.step: c.event_id for c in await _events(js, run_id, "checkpoint")}
    judged = {v.checkpoint_event_id: v.verdict for v in await _events(js, run_id, "audit.verdict")}
    ended = finished[-1] if finished and (not started or finished[-1].attempt >= started[-1].attempt) else None
    step = ended.step if ended is not None else await _latest_step(js, run_id)
    return RunProgress(
        run_id,
        started=bool(started),
        finished=ended.status if ended is not None else None,
        step=step,
        verdicts={s: judged.get(event_id, "pending") for s, event_id in newest.items()},
    )


async def _latest_step(js: JetStreamContext, run_id: str) -> int | None:
    try:
        last = await last_event(js, event_subject(run_id, "train.step"))
    except nats.js.errors.Error:  # no stream, or no direct get: the step is only for the message
        return None
    return last.event.step if last is not None and isinstance(last.event, TrainStep) else None


CACHE = Path(".trainbus") / "checkpoints"
"""Where a checkpoint fetched from the bus goes when this machine does not have its folder."""


async def localize(js: JetStreamContext, chosen: Chosen, cache: Path = CACHE) -> Chosen:
    """``chosen`` with a folder on this machine: its own, else fetched from the bus's object store
    (``runtime.bus.objects``) into ``cache`` and checked against the sha256 its event announced."""
    if chosen.path.is_dir() or chosen.event_id is None:
        return chosen
    dest = cache / chosen.run_id / f"checkpoint-{chosen.step}"
    if not dest.is_dir() or changed_since_announced(dest, chosen.sha256, chosen.event_id) is not None:
        try:
            obs = await js.object_store(CHECKPOINT_FILES_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            raise NotFound(f"checkpoint folder {chosen.path} is not on this machine, and the bus holds no checkpoint files") from None  # fmt: skip
        await fetch(obs, chosen.run_id, chosen.step, chosen.sha256, dest)
    return replace(chosen, path=dest)


def verify(chosen: Chosen) -> None:
    """Raise ``Refused`` unless the checkpoint folder hashes to what its event says."""
    if not chosen.path.is_dir():
        raise NotFound(f"checkpoint folder {chosen.path} does not exist (run {chosen.run_id}, step {chosen.step})")
    changed = changed_since_announced(chosen.path, chosen.sha256, chosen.event_id or "(none)")
    if changed is not None:
        raise Refused(changed)


def _config(event: RunStarted) -> RunConfig:
    try:
        return RunConfig.model_validate(event.config)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"run {event.run_id}: run.started config")) from None


def _step_of(path: str) -> int:
    tail = Path(path).name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def _sha_of(folder: Path) -> str:
    if not folder.is_dir():
        raise NotFound(f"checkpoint folder {folder} does not exist")
    return fingerprint(folder)[0]
