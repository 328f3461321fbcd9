"""The sweep's Optuna study: where it is stored, joining it, and reading it back (``trainbus sweep show``).

The study is named after the sweep and kept in any Optuna storage: by default a SQLite file
under the state folder (``<state_dir>/sweeps.db``), so ``optuna.load_study(study_name=NAME,
storage="sqlite:///.trainbus/sweeps.db")`` reads it with plain Optuna. Its user attributes say
what it searches (config, fixed overrides, objective, space); a driver that joins a study with
another search is refused. Each trial's user attributes hold its run id, the driver watching it
(with a lease that driver renews) and, once judged, the judgement.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from consumers.sweep.space import Space, space_json
from runtime.errors import ConfigError, NotFound
from runtime.settings import redact_url

DB_FILE = "sweeps.db"
STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}
LEASE_RENEW = 10.0
"""Seconds between a driver's renewals of the lease of each trial it watches."""
LEASE_SECONDS = 60.0
"""A trial whose lease is older than this lost its driver (on another host: clocks may differ a little)."""


def driver_identity() -> dict[str, Any]:
    """Who this driver is: host, pid and the process's start time (a reused pid is another process)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": round(psutil.Process().create_time(), 2)}


def abandoned(trial: FrozenTrial, me: dict[str, Any], now: float, lease: float = LEASE_SECONDS) -> bool:
    """Whether a running trial has no live driver, so ``me`` should judge it from the stream.

    On this host the answer is exact (is that driver's process still running?); a driver on
    another host is gone once it stopped renewing the trial's lease.
    """
    owner = trial.user_attrs.get("driver")
    if not isinstance(owner, dict):
        return True
    if owner == me:
        return False
    if owner.get("host") == me["host"]:
        try:
            return round(psutil.Process(int(owner["pid"])).create_time(), 2) != owner.get("started")
        except (psutil.Error, KeyError, TypeError, ValueError):
            return True
    return now - float(trial.user_attrs.get("lease", 0.0)) > lease


def storage_url(state_dir: str) -> str:
    """``sqlite:///<state_dir>/sweeps.db`` (absolute, so every process names the same file)."""
    return f"sqlite:///{Path(state_dir).resolve() / DB_FILE}"


def default_storage(state_dir: str) -> str:
    """``storage_url`` of the state folder, which is created for the SQLite file."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return storage_url(state_dir)


def _storage(url: str) -> optuna.storages.BaseStorage:
    try:
        return optuna.storages.get_storage(url)
    except Exception as exc:  # any driver or URL problem of SQLAlchemy/Optuna: name the storage, no traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--storage {redact_url(url)}: {first}") from None


DESCRIBED = "metric"
"""The study's user attribute its creator writes last: until it is there, the description is half written."""
DESCRIBING_S = 30.0
"""How long a joiner waits for a creator that is writing the description (a driver started beside it)."""


def _described(study: optuna.Study) -> dict[str, Any]:
    """The study's user attributes once its creator has written them all (empty for a new study).
    Two drivers started at once both create the study; the second must not judge a half-written
    description. After ``DESCRIBING_S`` (a creator that died writing), what is there."""
    deadline = time.monotonic() + DESCRIBING_S
    have = study.user_attrs
    while have and DESCRIBED not in have and time.monotonic() < deadline:
        time.sleep(0.2)
        have = study.user_attrs
    return have


def open_study(name: str, storage: str, space: Space, config: str, overrides: list[str]) -> optuna.Study:
    """Create the study ``name`` or join it; refuse to join one that searches something else."""
    store = _storage(storage)
    study = optuna.create_study(
        study_name=name, storage=store, direction=space.direction, load_if_exists=True, pruner=space.make_pruner()
    )
    want = {"config": config, "overrides": overrides, "search": space_json(space)}
    have = _described(study)
    if not have:
        for key, value in want.items():
            study.set_user_attr(key, value)
        study.set_user_attr("space_file", space.path)
        study.set_user_attr(DESCRIBED, space.metric)  # last: a joiner waits for it
        return study
    for key, value in want.items():
        if have.get(key) != value:
            shown = {"config": "config", "overrides": "--set overrides", "search": "objective or parameters"}[key]
            raise ConfigError(
                f"--name {name}: the sweep in {redact_url(storage)} was started with other {shown} "
                f"({json.dumps(have.get(key))[:200]}); use another --name for a new search"
            )
    return study


def load(name: str, storage: str) -> optuna.Study:
    """The existing study ``name``; ``NotFound`` listing the sweeps there otherwise."""
    store = _storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False))
        hint = f" (sweeps there: {', '.join(names[:20])})" if names else " (it holds no sweeps)"
        raise NotFound(f"no sweep {name!r} in {redact_url(storage)}{hint}") from None


def record_outcome(study: optuna.Study, number: int, state: str, value: float | None, **attrs: str | None) -> bool:
    """Tell the study how trial ``number`` ended (``state``: complete, pruned or fail) with its
    ``reason``/``checkpoint``/``verdict``; False when it was already finished there."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    trial = optuna.trial.Trial(study, frozen._trial_id)  # Optuna's own key of an asked trial
    try:
        for key, text in attrs.items():
            if text is not None:
                trial.set_user_attr(key, text)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    # the driver decides when the study has enough trials (--trials); the grid sampler's
    # after_trial would call study.stop(), which Optuna allows only inside study.optimize()
    study.sampler = optuna.samplers.RandomSampler()
    study.tell(number, value if state == "complete" else None, state=STATES[state], skip_if_finished=True)
    return True


def study_names(url: str) -> list[str]:
    """The sweeps stored at ``url`` (none when its SQLite file does not exist yet: never create it)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []
    summaries = optuna.get_all_study_summaries(_storage(url), include_best_trial=False)
    return sorted(s.study_name for s in summaries)


def sweep_data(url: str, name: str) -> dict[str, Any] | None:
    """What the dashboard's Sweep page shows of sweep ``name``: objective, parameters (with their
    scale) and every trial's row; None when the storage holds no such sweep. Plain data, cacheable."""
    if name not in study_names(url):
        return None
    study = optuna.load_study(study_name=name, storage=_storage(url))
    trials = study.get_trials(deepcopy=False)
    scales: dict[str, str] = {}
    for trial in trials:
        for key, dist in trial.distributions.items():
            categorical = isinstance(dist, optuna.distributions.CategoricalDistribution)
            scales[key] = "nominal" if categorical else ("log" if getattr(dist, "log", False) else "linear")
    top = best(study)
    return {
        "name": name,
        "metric": study.user_attrs.get("metric", "objective"),
        "direction": study.direction.name.lower(),
        "parameters": scales,
        "trials": [trial_row(t) for t in trials],
        "best": top.number if top is not None else None,
    }


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as ``trainbus sweep show`` prints it."""
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "objective": trial.value,
        "run_id": attrs.get("run_id"),
        "params": dict(trial.params),
        "last_step": trial.last_step,
        "checkpoint": attrs.get("checkpoint"),
        "verdict": attrs.get("verdict"),
        "reason": attrs.get("reason", ""),
    }


def best(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial, or None before one completes."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None


def describe_best(study: optuna.Study) -> list[str]:
    """Lines naming the best trial, its parameters, run id and approved checkpoint."""
    trial = best(study)
    metric = study.user_attrs.get("metric", "value")
    if trial is None:
        return [f"sweep {study.study_name}: no trial has completed yet"]
    attrs = trial.user_attrs
    params = " ".join(f"{k}={v}" for k, v in trial.params.items())
    lines = [
        f"best: trial {trial.number} (run {attrs.get('run_id')}): {metric} {trial.value:.4g}",
        f"  parameters: {params}",
    ]
    checkpoint, verdict = attrs.get("checkpoint"), attrs.get("verdict")
    if checkpoint and verdict == "approved":
        lines.append(f"  approved checkpoint: {checkpoint}")
    elif checkpoint:
        lines.append(
            f"  checkpoint: {checkpoint} (no audit verdict: is the audit gate running? `trainbus up` starts it)"
        )
    else:
        lines.append("  checkpoint: none (the run saved no checkpoint)")
    return lines
