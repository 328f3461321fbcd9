"""`trainbus train --resume RUN`: the run's own config, and the checkpoint it continues from.

A resumed run trains with the config its first attempt wrote to ``trainbus-run.json`` (its
``--set`` overrides included); only the shared settings (where the bus is, logging) come from
this command, and ``--set`` or ``TRAINBUS_*`` variables given now change it on top. It continues
from its newest checkpoint, or ``--from-checkpoint STEP``, or ``--from-approved`` (the newest one
the audit gate approved), and says which, with the audit gate's verdict on it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from producers.config import RunConfig
from runtime.bus.connect import bus_target, connected
from runtime.bus.stream import replay
from runtime.checkpoints import checkpoint_folders
from runtime.errors import BusUnavailable, ConfigError, NotFound
from runtime.settings import SHARED_SECTIONS, Problem, layers, validate_layers
from schemas import AuditVerdict, Checkpoint, check_run_id, event_subject

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
        saved = json.loads(run_file.read_text())["config"]
    except FileNotFoundError:
        raise NotFound(f"--resume {run_id}: no run folder {run_file.parent} (looked for {run_file})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {run_id}: {run_file} is not a run file trainbus can read ({exc})") from None
    own = {key: value for key, value in saved.items() if key not in SHARED_SECTIONS}
    return validate_layers(RunConfig, layers(RunConfig, config, overrides, base=(own, str(run_file))), check)


@dataclass(frozen=True)
class ResumeFrom:
    """What ``--resume`` asked for: the run, and ``--from-checkpoint STEP`` or ``--from-approved``."""

    run_id: str
    step: int | None = None
    approved: bool = False


@dataclass(frozen=True)
class Resume:
    """Where a resumed run continues: the checkpoint folder and what the audit gate said of it."""

    path: Path
    step: int
    verdict: AuditVerdict | None
    verdicts_known: bool


async def _verdicts(cfg: RunConfig, run_id: str) -> dict[int, AuditVerdict]:
    with bus_target(cfg, announce=False) as target:
        async with connected(target, cfg, name="trainbus-resume") as nc:
            js = nc.jetstream()
            newest: dict[int, str] = {}  # step -> event id of the newest checkpoint saved there
            judged: dict[str, AuditVerdict] = {}
            try:
                async for item in replay(js, event_subject(run_id, "checkpoint")):
                    if isinstance(item.event, Checkpoint):
                        newest[item.event.step] = item.event.event_id
                async for item in replay(js, event_subject(run_id, "audit.verdict")):
                    if isinstance(item.event, AuditVerdict):
                        judged[item.event.checkpoint_event_id] = item.event
            except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                pass  # no stream: nothing was judged
            # a later attempt that saved at the same step replaced the folder: an older verdict is not about it
            return {step: judged[event_id] for step, event_id in newest.items() if event_id in judged}


def read_verdicts(cfg: RunConfig, run_id: str) -> dict[int, AuditVerdict] | None:
    """The audit gate's verdicts on the run's checkpoints by step; None when the bus cannot say."""
    try:
        return asyncio.run(_verdicts(cfg, run_id))
    except (BusUnavailable, TimeoutError, nats.errors.Error):
        return None


def choose_checkpoint(
    run_id: str,
    run_dir: Path,
    verdicts: dict[int, AuditVerdict] | None,
    *,
    from_step: int | None = None,
    from_approved: bool = False,
) -> Resume:
    """The checkpoint a resumed run continues from (see the module docstring); ``verdicts`` by
    step as ``read_verdicts`` gives them (None: unknown)."""
    folders = checkpoint_folders(run_dir)
    if not folders:
        raise NotFound(f"--resume {run_id}: {run_dir} has no checkpoint-* folder to continue from")
    steps = ", ".join(map(str, folders))
    if from_approved:
        if verdicts is None:
            raise BusUnavailable("--from-approved: the bus cannot be reached to read the audit gate's verdicts")
        approved = [step for step in folders if (v := verdicts.get(step)) is not None and v.verdict == "approved"]
        if not approved:
            raise NotFound(
                f"--from-approved: the audit gate approved none of the checkpoints of {run_id} (steps {steps})"
            )
        step = approved[-1]
    elif from_step is not None:
        if from_step not in folders:
            raise NotFound(f"--from-checkpoint {from_step}: no checkpoint-{from_step} in {run_dir} (steps: {steps})")
        step = from_step
    else:
        step = max(folders)
    verdict = verdicts.get(step) if verdicts is not None else None
    return Resume(folders[step], step, verdict, verdicts is not None)


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
