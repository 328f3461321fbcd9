"""`trainbus submit CONFIG`: queue a training run for a `trainbus agent` with free slots.

    trainbus submit configs/tiny.yaml --set training.max_steps=200 --priority high
    trainbus submit configs/presets/qwen2.5-7b.yaml --slots 2 --on gpu=a100

The config is checked as `trainbus train` would check it (every mistake named, exit 2) before
anything is queued. The job carries the config's text and the ``--set`` items, so an agent on
another machine needs no copy of the file; data files it names must exist where the agent runs.
Prints the job id and the run id, which `trainbus queue`, `trainbus cancel` and every run command
then take.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import yaml

from producers.run.fork import fork_arg
from runtime.bus.connect import BusTarget, bus_target, issuer
from runtime.bus.stream import jetstream
from runtime.cli.args import key_values
from runtime.errors import BusUnavailable, ConfigError
from runtime.launch.queue import enqueue, ensure_queue, new_job_id
from runtime.settings import Settings, load_config, packaged
from schemas import check_run_id
from schemas.jobs import PRIORITIES, JobRecord, JobSpec


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="queue a training run for an agent with free slots (trainbus agent)")
    p.add_argument("config", nargs="?", help="run config YAML, e.g. configs/tiny.yaml (checked before it is queued)")
    p.add_argument("--fork", metavar="RUN[@STEP|@best]", type=fork_arg,
                   help="a new run from RUN's checkpoint, with RUN's config and --set on top (as `train --fork`)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="with --fork: fork a checkpoint the audit gate rejected")
    p.add_argument("--seeds", type=int, metavar="N", help="N jobs that differ only in training.seed, one group")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config key, e.g. training.max_steps=40")  # fmt: skip
    p.add_argument("--run-id", help="choose the run id (default: <run_name>-<timestamp>)")
    p.add_argument(
        "--slots", type=int, default=1, help="processes/GPUs the run needs (default 1; >1 runs under torchrun)"
    )
    p.add_argument(
        "--priority", choices=PRIORITIES, default="normal", help="agents take high first, then normal, then low"
    )
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="times the run is resumed elsewhere when its agent is lost (default 3)")  # fmt: skip
    p.add_argument("--on", action="append", default=[], metavar="KEY=VALUE", dest="requires",
                   help="only an agent with this label runs it (trainbus agent --label KEY=VALUE)")  # fmt: skip
    p.set_defaults(func=cmd_submit)


def build_specs(args: argparse.Namespace) -> tuple[list[JobSpec], Settings]:
    """The jobs `submit` would queue (one, or one per seed), the config checked as `trainbus train` checks it."""
    cfg, name, text = _config(args)
    base = args.run_id or f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = [(base, [])] if not args.seeds else [(f"{base}-s{seed}", [f"training.seed={seed}"]) for seed in range(cfg.training.seed, cfg.training.seed + args.seeds)]  # fmt: skip
    try:
        specs = [_spec(args, run_id, name, text, seed, group=base if args.seeds else None) for run_id, seed in runs]
    except ValueError as exc:
        raise ConfigError(_first_problem(exc)) from None
    return specs, cfg


def _spec(
    args: argparse.Namespace, run_id: str, name: str, text: str, seed: list[str], *, group: str | None
) -> JobSpec:
    return JobSpec(
        job_id=new_job_id(), run_id=check_run_id(run_id), config_name=name, config_yaml=text,
        overrides=[*args.overrides, *seed], slots=args.slots, priority=args.priority, max_restarts=args.max_restarts,
        requires=key_values(args.requires, "--on", "gpu=a100"), fork=str(args.fork) if args.fork else None,
        force=args.force, group=group, submitted_by=issuer(),
    )  # fmt: skip


def _config(args: argparse.Namespace) -> tuple[Any, str, str]:
    """The run config (checked), its name and its text: the file's, or a fork's parent's."""
    from producers.config import RunConfig
    from producers.run.arguments import check_training
    from producers.run.fork import fork_config

    if args.fork is not None:
        if args.config is not None:
            raise ConfigError("--fork trains with the parent's config: leave out CONFIG and change it with --set")
        here = load_config(RunConfig, None, [o for o in args.overrides if o.startswith(("bus.", "log.", "state_dir"))])
        cfg, parent = fork_config(here, args.fork, args.overrides, check=check_training)
        return cfg, f"fork of {args.fork}", yaml.safe_dump(parent, sort_keys=False)
    if args.config is None:
        raise ConfigError("a run config is needed, e.g. trainbus submit configs/tiny.yaml (or --fork RUN@STEP)")
    path = packaged(args.config)
    return load_config(RunConfig, path, args.overrides, check=check_training), args.config, Path(path).read_text()


def cmd_submit(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds N: at least 1")
    specs, settings = build_specs(args)
    with bus_target(settings, announce=False) as target:
        if target.server is not None:
            raise BusUnavailable(
                "no bus is running to queue on: start `trainbus up` (it runs a local agent) or set NATS_URL"
            )
        records = asyncio.run(_submit(target, settings, specs))
    for record in records:
        print(f"queued job {record.spec.job_id} for run {record.spec.run_id} ({_describe(record)})")
    return 0


async def _submit(target: BusTarget, settings: Settings, specs: list[JobSpec]) -> list[JobRecord]:
    async with jetstream(target, settings, "trainbus-submit") as nc:
        js = nc.jetstream()
        await ensure_queue(js, settings.stream)
        return [await enqueue(js, spec) for spec in specs]


def _describe(record: JobRecord) -> str:
    spec = record.spec
    slots = f"{spec.slots} slot" + ("s" if spec.slots > 1 else "")
    return f"priority {spec.priority}, {slots}; `trainbus queue` shows where it stands"


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = {"slots": "--slots", "max_restarts": "--max-restarts", "run_id": "--run-id"}.get(
            str(first["loc"][0]), ".".join(str(p) for p in first["loc"])
        )
        return f"{where}: {first['msg']}"
    return str(exc)
