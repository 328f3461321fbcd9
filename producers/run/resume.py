"""`trainbus train --resume RUN`: the run's own config, and the checkpoint it continues from.

A resumed run trains with the config its first attempt wrote to ``trainbus-run.json`` (its
``--set`` overrides included); only the shared settings (where the bus is, logging) come from
this command, and ``--set`` or ``TRAINBUS_*`` variables given now change it on top. It continues
from its newest checkpoint, or ``--from-checkpoint STEP``, or ``--from-approved`` (the newest one
the audit gate approved), and says which, with the audit gate's verdict on it. A checkpoint
whose files no longer hash to the sha256 of its ``checkpoint`` event is refused.

On a machine that never ran the run (an agent resuming it after another was lost), the bus has
what the run folder would: the config of its last ``run.started``, its attempt, and its checkpoints
in the object store (``runtime.bus.objects``), fetched into the run folder and checked against
their announced sha256 before training.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from producers.config import RunConfig
from runtime.bus.connect import bus_target, connected
from runtime.bus.objects import existing_store, fetch
from runtime.bus.stream import replay
from runtime.checkpoints import changed_since_announced, checkpoint_folders
from runtime.errors import BusUnavailable, ConfigError, NotFound
from runtime.logs import get_logger
from runtime.settings import SHARED_SECTIONS, Problem, layers, validate_layers
from schemas import EVENTS_STREAM, AuditVerdict, Checkpoint, RunStarted, check_run_id, event_subject, parse_event

RUN_FILE = "trainbus-run.json"
"""Written in the run folder at every attempt: run id, attempt and the run's config."""


def restore_config(
    config: str | None,
    overrides: Iterable[str],
    run_id: str,
    *,
    check: Callable[[RunConfig], list[Problem]] | None = None,
) -> RunConfig:
    """The config of run ``run_id`` as it last trained, with this command's settings and overrides."""
    overrides = list(overrides)
    here = validate_layers(RunConfig, layers(RunConfig, config, overrides))  # where its run folders are
    run_file = Path(here.training.output_dir) / check_run_id(run_id) / RUN_FILE
    try:
        saved, where = json.loads(run_file.read_text())["config"], str(run_file)
    except FileNotFoundError:
        saved, where = _config_on_the_bus(here, run_id, run_file), f"the run.started of {run_id} on the bus"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {run_id}: {run_file} is not a run file trainbus can read ({exc})") from None
    own = {key: value for key, value in saved.items() if key not in SHARED_SECTIONS}
    return validate_layers(RunConfig, layers(RunConfig, config, overrides, base=(own, where)), check)


def _config_on_the_bus(cfg: RunConfig, run_id: str, run_file: Path) -> dict[str, Any]:
    started = last_started(cfg, run_id)
    if started is None:
        raise NotFound(f"--resume {run_id}: no run folder {run_file.parent} here, and no run.started of it on the bus")
    return started.config


async def _last_started(cfg: RunConfig, run_id: str) -> RunStarted | None:
    with bus_target(cfg, announce=False) as target:
        async with connected(target, cfg, name="trainbus-resume") as nc:
            try:
                msg = await nc.jetstream().get_last_msg(EVENTS_STREAM, event_subject(run_id, "run.started"))
            except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                return None
            event = parse_event(msg.data or b"")
            return event if isinstance(event, RunStarted) else None


def last_started(cfg: RunConfig, run_id: str) -> RunStarted | None:
    """The run's newest ``run.started`` on the bus (its config, its attempt); None when there is none
    or the bus cannot be reached."""
    try:
        return asyncio.run(_last_started(cfg, run_id))
    except (BusUnavailable, TimeoutError, nats.errors.Error, ValueError):
        return None


def fetcher(cfg: RunConfig) -> Callable[[Checkpoint, Path], None]:
    """Fetch an announced checkpoint from the bus's object store into a folder, checked against its sha256."""

    async def get(event: Checkpoint, dest: Path) -> None:
        with bus_target(cfg, announce=False) as target:
            async with connected(target, cfg, name="trainbus-resume-fetch") as nc:
                obs = await existing_store(nc.jetstream())
                await fetch(obs, event.run_id, event.step, event.sha256, dest)

    def fetch_one(event: Checkpoint, dest: Path) -> None:
        get_logger(run_id=event.run_id).info("fetching the checkpoint from the bus", step=event.step, to=str(dest))
        try:
            asyncio.run(get(event, dest))
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(
                f"checkpoint-{event.step} of {event.run_id} could not be fetched from the bus: {exc}"
            ) from None

    return fetch_one


def next_attempt(cfg: RunConfig, run_id: str, run_dir: Path) -> int:
    """The attempt a resume is: one more than the highest this machine's run file or the bus knows
    (the run may have gone on elsewhere since this machine last trained it)."""
    here = 0
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        here = int(json.loads((run_dir / RUN_FILE).read_text()).get("attempt", 1))
    started = last_started(cfg, run_id)
    there = started.attempt if started is not None else 0
    if not here and not there:
        raise NotFound(f"--resume {run_id}: no run folder {run_dir} here, and no run.started of it on the bus")
    return max(here, there) + 1


@dataclass(frozen=True)
class ResumeFrom:
    """What ``--resume`` asked for: the run, and ``--from-checkpoint STEP`` or ``--from-approved``."""

    run_id: str
    step: int | None = None
    approved: bool = False


@dataclass(frozen=True)
class Saved:
    """What the stream says of a run's checkpoints, by step: the newest ``checkpoint`` event saved
    there (a later attempt that saved at the same step replaced the folder) and the audit gate's
    verdict on that event."""

    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    verdicts: dict[int, AuditVerdict] = field(default_factory=dict)


@dataclass(frozen=True)
class Resume:
    """Where a resumed run continues: the checkpoint folder and what the audit gate said of it."""

    path: Path
    step: int
    verdict: AuditVerdict | None
    verdicts_known: bool


async def _saved(cfg: RunConfig, run_id: str) -> Saved:
    with bus_target(cfg, announce=False) as target:
        async with connected(target, cfg, name="trainbus-resume") as nc:
            js = nc.jetstream()
            saved = Saved()
            judged: dict[str, AuditVerdict] = {}
            try:
                async for item in replay(js, event_subject(run_id, "checkpoint")):
                    if isinstance(item.event, Checkpoint):
                        saved.checkpoints[item.event.step] = item.event
                async for item in replay(js, event_subject(run_id, "audit.verdict")):
                    if isinstance(item.event, AuditVerdict):
                        judged[item.event.checkpoint_event_id] = item.event
            except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                pass  # no stream: nothing was saved or judged
            for step, event in saved.checkpoints.items():
                if event.event_id in judged:  # an older verdict at this step is about files no longer there
                    saved.verdicts[step] = judged[event.event_id]
            return saved


def read_saved(cfg: RunConfig, run_id: str) -> Saved | None:
    """The run's checkpoint events and the audit gate's verdicts by step; None when the bus cannot say."""
    try:
        return asyncio.run(_saved(cfg, run_id))
    except (BusUnavailable, TimeoutError, nats.errors.Error):
        return None


def choose_checkpoint(
    run_id: str,
    run_dir: Path,
    saved: Saved | None,
    *,
    from_step: int | None = None,
    from_approved: bool = False,
    fetch: Callable[[Checkpoint, Path], None] | None = None,
) -> Resume:
    """The checkpoint a resumed run continues from (see the module docstring); ``saved`` as
    ``read_saved`` gives it (None: unknown). Files that no longer hash to what their ``checkpoint``
    event announced are refused. A checkpoint the stream announced but this machine lacks counts
    too: ``fetch`` brings it from the bus's object store."""
    folders = checkpoint_folders(run_dir)
    elsewhere = {
        step: run_dir / f"checkpoint-{step}" for step in (saved.checkpoints if saved else {}) if step not in folders
    }
    folders = dict(sorted({**folders, **elsewhere}.items()))
    if not folders:
        raise NotFound(f"--resume {run_id}: {run_dir} has no checkpoint-* folder to continue from")
    step = _step(run_id, run_dir, folders, saved, from_step, from_approved)
    event = saved.checkpoints.get(step) if saved is not None else None
    if step in elsewhere and event is not None and fetch is not None:
        fetch(event, folders[step])  # only on the bus: fetched, checked against its sha256
    changed = changed_since_announced(folders[step], event.sha256, event.event_id) if event is not None else None
    if changed is not None:
        raise ConfigError(f"--resume {run_id}: {changed}")
    verdict = saved.verdicts.get(step) if saved is not None else None
    return Resume(folders[step], step, verdict, saved is not None)


def _step(
    run_id: str,
    run_dir: Path,
    folders: dict[int, Path],
    saved: Saved | None,
    from_step: int | None,
    from_approved: bool,
) -> int:
    steps = ", ".join(map(str, folders))
    if from_approved:
        if saved is None:
            raise BusUnavailable("--from-approved: the bus cannot be reached to read the audit gate's verdicts")
        approved = [step for step in folders if (v := saved.verdicts.get(step)) is not None and v.verdict == "approved"]
        if not approved:
            raise NotFound(
                f"--from-approved: the audit gate approved none of the checkpoints of {run_id} (steps {steps})"
            )
        return approved[-1]
    if from_step is not None:
        if from_step not in folders:
            raise NotFound(f"--from-checkpoint {from_step}: no checkpoint-{from_step} in {run_dir} (steps: {steps})")
        return from_step
    return max(folders)


def check_room(run_id: str, resume: Resume, max_steps: int) -> None:
    """Refuse to resume from a checkpoint at or past ``training.max_steps``: there is nothing left to train."""
    if resume.step >= max_steps:
        raise ConfigError(
            f"--resume {run_id}: checkpoint-{resume.step} is already at training.max_steps ({max_steps}); "
            f"--set training.max_steps=N (more than {resume.step}) to train on"
        )


def announce(resume: Resume, log: Any) -> None:
    """Say which checkpoint the run continues from; warn when the audit gate rejected it."""
    verdict: str = resume.verdict.verdict if resume.verdict is not None else "not judged by the audit gate"
    if not resume.verdicts_known:
        verdict = "unknown (the bus cannot be reached)"
    log.info("resuming", checkpoint=str(resume.path), step=resume.step, verdict=verdict)
    if resume.verdict is not None and resume.verdict.verdict == "rejected":
        log.warning(
            "the audit gate rejected this checkpoint; --from-approved continues from the newest approved one",
            step=resume.step,
            reasons=list(resume.verdict.reasons),
        )
