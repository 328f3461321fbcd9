"""`trainbus sweep` (the driver) and `trainbus sweep show NAME` (every trial of a sweep).

trainbus sweep configs/tiny.yaml --space configs/sweeps/tiny.yaml --trials 8 --parallel 2 --name lr-r
trainbus sweep configs/tiny.yaml --space configs/sweeps/tiny.yaml --trials 8 --parallel 4 --queue
trainbus sweep show lr-r

With ``--queue`` each trial is a job in the launch queue, trained by any `trainbus agent` with a
free slot, instead of a process on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from consumers.sweep.progress import IN_A_LOG, ON_A_TERMINAL
from runtime.bus.connect import BusTarget, bus_target, connect
from runtime.bus.stream import ensure_stream
from runtime.cli.args import seconds_arg
from runtime.cli.render import table
from runtime.errors import ConfigError
from runtime.launch.queue import ensure_queue
from runtime.lifecycle import STALL_AFTER_SECONDS
from runtime.logs import setup_logging
from runtime.settings import Settings, layers, packaged, redact_url, validate_layers
from schemas.common import SWEEP_NAME_PATTERN

SHOW = "show"


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return number


def register_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyper-parameter search with Optuna: each trial a `trainbus train` run, judged from the bus",
        description="trainbus sweep CONFIG --space SPACE --trials N [--parallel K] [--queue] [--name NAME] [--storage URL]\n"
        "trainbus sweep show NAME [--storage URL] [--json]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", type=packaged, help="run config YAML of every trial, or `show`")
    p.add_argument("show_name", metavar="NAME", nargs="?", help="with `show`: the sweep to print")
    p.add_argument("--space", metavar="YAML", type=packaged, help="search space file, e.g. configs/sweeps/tiny.yaml")
    p.add_argument("--trials", type=_positive, help="how many trials the study should have in all")
    p.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        help=f"trials running at once (default 1; at most the cores, {cores()} here: each trial gets an equal share; "
        "with --queue: trials queued or running at once, on the agents' slots)",
    )
    p.add_argument(
        "--queue",
        action="store_true",
        help="queue each trial as a job for `trainbus agent`s on any machine, instead of training it here",
    )
    p.add_argument("--name", help="the sweep (Optuna study) name; drivers with the same name share the study")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///<state_dir>/sweeps.db)")
    p.add_argument(
        "--verdict-timeout",
        type=seconds_arg,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the audit gate's verdict on a trial's last checkpoint (default 60)",
    )
    p.add_argument(
        "--stall-after",
        type=seconds_arg,
        default=STALL_AFTER_SECONDS,
        metavar="SECONDS",
        help="a trial this driver did not start (a restart) fails after this long without a trainer event "
        f"(default {STALL_AFTER_SECONDS:.0f})",
    )
    p.add_argument("--json", action="store_true", help="with `show`: one JSON object per trial")
    every_trial = "override a config key of every trial, e.g. training.max_steps=40 (`show`: state_dir)"
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides", help=every_trial)
    p.set_defaults(func=cmd_sweep)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_trial(parallel: int) -> int:
    """Each trial's torch threads: an equal share of the cores, at least one. Trials whose threads
    together outnumber the cores slow each other down far more than the extra threads gain: OpenMP
    threads busy-wait for cores another trial holds."""
    return max(1, cores() // parallel)


def share_line(parallel: int, queue: bool = False) -> str:
    """How the trials share the machine (or the agents), said once when the sweep starts."""
    if queue:
        return f"each trial is a job in the launch queue, {parallel} at a time, for any agent with a free slot"
    have, threads = cores(), threads_per_trial(parallel)
    if "OMP_NUM_THREADS" in os.environ:
        return f"each trial uses OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} torch threads (as set); {have} cores"
    line = f"each trial uses {threads} torch thread{'s' if threads > 1 else ''} ({have} cores, {parallel} at a time)"
    if parallel > have:
        line += f"; --parallel {parallel} is more than the cores: trials share them and each runs slower"
    return line


def driver_settings(config: str | None, overrides: list[str]) -> Settings:
    """The shared sections (bus, stream, server, log, state_dir) of a run config, env and ``--set``:
    the driver reads only these; the trainer checks the rest."""
    built = layers(Settings, config, overrides)
    built.tree = {k: v for k, v in built.tree.items() if k in Settings.model_fields}
    settings = validate_layers(Settings, built)
    setup_logging(settings.log.level, settings.log.format)
    return settings


def cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver says what happens, once
    if args.config == SHOW and args.show_name:
        return cmd_show(args)
    if args.show_name:
        raise ConfigError(f"unexpected argument {args.show_name!r} (`trainbus sweep show NAME` prints a sweep)")
    for flag, value in (("--space", args.space), ("--trials", args.trials)):
        if value is None:
            raise ConfigError(f"{flag} is required (trainbus sweep CONFIG --space SPACE --trials N)")
    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: no such config file")
    name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.match(SWEEP_NAME_PATTERN, name):
        raise ConfigError(f"--name {name!r}: use 1-48 characters of A-Z a-z 0-9 _ -")
    from consumers.sweep.space import load_space
    from consumers.sweep.study import default_storage, open_study

    space = load_space(args.space)
    settings = driver_settings(args.config, args.overrides)
    storage = args.storage or default_storage(settings.state_dir)
    study = open_study(name, storage, space, args.config, list(args.overrides))
    print(
        f"sweep {name}: {args.trials} trials of {args.config} over {args.space}, {args.parallel} at a time; "
        f"{space.direction} {space.metric}; study {name} in {redact_url(storage)}",
        flush=True,
    )
    print(f"sweep {name}: {share_line(args.parallel, args.queue)}", flush=True)
    with bus_target(settings) as target:
        return asyncio.run(_drive(target, settings, study, args, name, space))


async def _drive(target: BusTarget, settings: Settings, study: Any, args: argparse.Namespace, name: str, space: Any) -> int:  # fmt: skip
    from consumers.sweep.driver import Sweep, SweepOptions

    opts = SweepOptions(
        name=name,
        config=args.config,
        space=space,
        trials=args.trials,
        parallel=args.parallel,
        overrides=list(args.overrides),
        verdict_timeout=args.verdict_timeout,
        stall_after=args.stall_after,
        log_dir=Path(settings.state_dir) / "sweeps" / name,
        bus_url=",".join(target.servers),
        threads=0 if args.queue else threads_per_trial(args.parallel),
        progress_every=ON_A_TERMINAL if sys.stdout.isatty() else IN_A_LOG,
        queue=args.queue,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect(target, settings, name=f"trainbus-sweep-{name}")
    try:
        await (ensure_queue if opts.queue else ensure_stream)(nc.jetstream(), settings.stream)
        return await Sweep(opts, study, nc).run(stop)
    finally:
        await nc.close()


def cmd_show(args: argparse.Namespace) -> int:
    from consumers.sweep.study import default_storage, describe_best, load, trial_row

    settings = driver_settings(None, args.overrides)
    storage = args.storage or default_storage(settings.state_dir)
    study = load(args.show_name, storage)
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    metric = study.user_attrs.get("metric", "objective")
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    for row in rows:
        row.update(row.pop("params"))
        row[metric] = row.pop("objective")
        row["reason"] = (row["reason"] or "")[:100]
    columns = ["trial", "state", metric, "run_id", *keys, "last_step", "verdict", "reason"]
    print(f"sweep {study.study_name}: {len(rows)} trials, {study.direction.name.lower()} {metric}")
    print(table(rows, columns))
    for line in describe_best(study):
        print(line)
    return 0
