"""`trainbus train --fork RUN[@STEP|@best]`: a new run that starts from another run's checkpoint.

    trainbus train --fork tiny-1@200 --set training.learning_rate=1e-3 --run-id tiny-1-lr
    trainbus train --fork tiny-1@best --set training.max_steps=900
    trainbus train --fork tiny-1 --force          # its newest checkpoint, even one the gate rejected

The fork trains with its parent's config (from the parent's ``run.started``) with the given
``--set`` items on top, from the parent's checkpoint: the newest, the one at STEP, or the audit
gate's best approved one (``@best``). Its steps count on from the parent's: the weights, the
optimizer and the schedule go on from there, with the changed hyper-parameters applied. The
checkpoint is checked against the sha256 its ``checkpoint`` event announced before training (and
fetched from the bus's object store when this machine does not have it); one the audit gate
rejected is refused unless ``--force``. The fork's ``run.started`` names its parent, the step, the
checkpoint's sha256 and every setting that differs (``ForkTag``), so forks of forks form a lineage.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from producers.config import RunConfig
from producers.run.resume import Saved, fetcher, last_started, read_saved
from runtime.bus.connect import bus_target, connected
from runtime.checkpoints import changed_since_announced
from runtime.errors import BusUnavailable, ConfigError, NotFound
from runtime.settings import SHARED_SECTIONS, Problem, layers, validate_layers
from schemas import AuditVerdict, Checkpoint, ForkTag, check_run_id
from schemas.subjects import CHECKPOINTS_BUCKET


@dataclass(frozen=True)
class ForkFrom:
    """What ``--fork`` asked for: the parent run, and a step or its best checkpoint (else its newest)."""

    parent: str
    step: int | None = None
    best: bool = False

    def __str__(self) -> str:
        return self.parent + ("@best" if self.best else f"@{self.step}" if self.step is not None else "")


def fork_arg(value: str) -> ForkFrom:
    """argparse ``type=`` for ``RUN``, ``RUN@STEP`` or ``RUN@best``."""
    run, _, at = value.partition("@")
    try:
        check_run_id(run)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if at in ("", "best"):
        return ForkFrom(run, best=at == "best")
    if not at.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: use RUN, RUN@STEP or RUN@best")
    return ForkFrom(run, step=int(at))


@dataclass(frozen=True)
class Forking:
    """A fork to make: from where, whether a rejected checkpoint may be used, and the parent's own config."""

    asked: ForkFrom
    force: bool
    parent: dict[str, Any]


@dataclass(frozen=True)
class Forked:
    """The checkpoint a fork starts from, checked, on this machine."""

    event: Checkpoint
    path: Path
    verdict: AuditVerdict | None


def parent_config(cfg: RunConfig, asked: ForkFrom) -> dict[str, Any]:
    """The parent's own config (its newest ``run.started``'s, shared sections left out)."""
    started = last_started(cfg, asked.parent)
    if started is None:
        raise NotFound(f"--fork {asked}: no run.started of {asked.parent} on the bus (see `trainbus runs`)")
    return {key: value for key, value in started.config.items() if key not in SHARED_SECTIONS}


def fork_config(
    here: RunConfig, asked: ForkFrom, overrides: list[str], check: Callable[[RunConfig], list[Problem]] | None = None
) -> tuple[RunConfig, dict[str, Any]]:
    """The fork's config (its parent's, with this command's settings and ``--set`` items on top) and the parent's."""
    base = parent_config(here, asked)
    where = f"the config of {asked.parent}"
    built = layers(RunConfig, None, overrides, base=(copy.deepcopy(base), where))  # the layers fold into their base
    return validate_layers(RunConfig, built, check), base


def changed(parent: Mapping[str, Any], fork: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each dotted config key whose value differs: ``{"training.learning_rate": {"from": …, "to": …}}``."""
    a, b = _flat(parent), _flat(fork)
    return {
        key: {"from": a.get(key), "to": b.get(key)} for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)
    }


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in SHARED_SECTIONS and not prefix:
            continue
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


async def _best_event_id(cfg: RunConfig, run_id: str) -> str | None:
    with bus_target(cfg, announce=False) as target:
        async with connected(target, cfg, name="trainbus-fork") as nc:
            try:
                kv = await nc.jetstream().key_value(CHECKPOINTS_BUCKET)
                entry = await kv.get(f"{run_id}.best")
            except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
                return None
            return str(json.loads(entry.value or b"{}").get("checkpoint_event_id") or "") or None


def choose(saved: Saved, asked: ForkFrom, best_event_id: str | None) -> Checkpoint:
    """The parent's checkpoint event the fork starts from (see the module docstring)."""
    steps = ", ".join(map(str, saved.checkpoints)) or "none"
    if asked.best:
        found = [c for c in saved.checkpoints.values() if c.event_id == best_event_id]
        if not found:
            raise NotFound(f"--fork {asked}: the audit gate approved no checkpoint of {asked.parent} (checkpoints at steps: {steps})")  # fmt: skip
        return found[0]
    if not saved.checkpoints:
        raise NotFound(f"--fork {asked}: {asked.parent} announced no checkpoint")
    step = asked.step if asked.step is not None else max(saved.checkpoints)
    if step not in saved.checkpoints:
        raise NotFound(f"--fork {asked}: {asked.parent} has no checkpoint at step {step} (steps: {steps})")
    return saved.checkpoints[step]


def resolve(cfg: RunConfig, asked: ForkFrom, run_dir: Path, *, force: bool) -> Forked:
    """The parent's checkpoint, chosen, judged (a rejected one only with ``force``), on this machine, checked."""
    saved = read_saved(cfg, asked.parent)
    if saved is None:
        raise BusUnavailable(f"--fork {asked}: the bus cannot be reached to read {asked.parent}'s checkpoints")
    event = choose(saved, asked, asyncio.run(_best_event_id(cfg, asked.parent)) if asked.best else None)
    verdict = saved.verdicts.get(event.step)
    if verdict is not None and verdict.verdict == "rejected" and not force:
        reasons = "; ".join(verdict.reasons) or "no reason given"
        raise ConfigError(
            f"--fork {asked}: the audit gate rejected checkpoint-{event.step} of {asked.parent} ({reasons}); "
            "--force forks it anyway"
        )
    return Forked(event, _on_this_machine(cfg, event, run_dir), verdict)


def _on_this_machine(cfg: RunConfig, event: Checkpoint, run_dir: Path) -> Path:
    here = Path(event.path)
    if here.is_dir() and changed_since_announced(here, event.sha256, event.event_id) is None:
        return here
    copy = run_dir / f"fork-of-{event.run_id}-{event.step}"
    if not copy.is_dir() or changed_since_announced(copy, event.sha256, event.event_id) is not None:
        try:
            fetcher(cfg)(event, copy)
        except (NotFound, BusUnavailable, TimeoutError, nats.errors.Error) as exc:
            if here.is_dir():  # the parent's folder is here but changed: say that, not the fetch
                raise ConfigError(f"--fork: {changed_since_announced(here, event.sha256, event.event_id)}") from None
            raise NotFound(f"--fork: checkpoint-{event.step} of {event.run_id} is neither here ({here}) nor fetchable: {exc}") from None  # fmt: skip
    return copy


def announce_fork(found: Forked, fork: Forking, log: Any) -> None:
    """Say where the fork starts; warn when it starts from a checkpoint the audit gate rejected (``--force``)."""
    verdict = found.verdict.verdict if found.verdict is not None else "not judged by the audit gate"
    log.info("forking", parent=found.event.run_id, step=found.event.step, checkpoint=str(found.path), verdict=verdict)
    if found.verdict is not None and found.verdict.verdict == "rejected":
        log.warning("forking a checkpoint the audit gate rejected (--force)", reasons=list(found.verdict.reasons))


def tag(forked: Forked, parent: Mapping[str, Any], fork: Mapping[str, Any]) -> ForkTag:
    """What the fork's ``run.started`` says of where it comes from."""
    e = forked.event
    return ForkTag(parent=e.run_id, step=e.step, sha256=e.sha256, checkpoint_event_id=e.event_id, changed=changed(parent, fork))  # fmt: skip
