"""CLI commands of the trainer: `trainbus train` and `trainbus sample-data` (entry-point plugins)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from producers.run.fork import fork_arg
from runtime.logs import console_output, setup_logging
from runtime.settings import load_config, packaged
from schemas import SweepTag


def register_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune with a LoRA-family adapter and stream the run to the bus")
    p.add_argument(
        "config",
        nargs="?",
        type=packaged,
        help="run config YAML, e.g. configs/tiny.yaml (trainbus's own configs/ are found from any folder; "
        "optional with --resume, which uses the run's own config)",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override a config key, e.g. training.max_steps=40",
    )
    p.add_argument("--run-id", help="choose the run id (default: <run_name>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue RUN_ID with its own config from its last checkpoint (attempt + 1); --set changes it",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-checkpoint", type=int, metavar="STEP", help="with --resume: continue from checkpoint-STEP"
    )
    start.add_argument(
        "--from-approved",
        action="store_true",
        help="with --resume: continue from the newest checkpoint the audit gate approved",
    )
    p.add_argument(
        "--offline-ok",
        action="store_true",
        help="train even when the bus is unreachable: events wait in the run's outbox and are sent once it connects",
    )
    p.add_argument("--fork", metavar="RUN[@STEP|@best]", type=fork_arg,
                   help="start a new run from RUN's checkpoint (its newest, at STEP, or the audit gate's best) with RUN's config and --set on top")  # fmt: skip
    p.add_argument("--force", action="store_true", help="with --fork: fork a checkpoint the audit gate rejected")
    p.add_argument(
        "--seeds", type=int, metavar="N", help="N runs that differ only in training.seed, one group (<run-id>-s<seed>)"
    )
    p.add_argument("--group", help=argparse.SUPPRESS)  # set by --seeds on each of its runs
    p.add_argument("--sweep", metavar="NAME", help="tag run.started as a trial of sweep NAME (set by `trainbus sweep`)")
    p.add_argument("--trial", metavar="K", type=int, help="with --sweep: the trial number")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    _check_starts(args)
    cfg, fork = _config_of(args)
    setup_logging(cfg.log.level, cfg.log.format)
    if args.seeds:
        from producers.run.seeds import train_seeds

        return train_seeds(cfg, args)
    quiet_libraries(cfg)
    if args.offline_ok:
        cfg.publish.offline_ok = True
    from producers.run.resume import ResumeFrom
    from producers.run.train import run

    resume = ResumeFrom(args.resume, args.from_checkpoint, args.from_approved) if args.resume else None
    sweep = _sweep_tag(args.sweep, args.trial)
    return run(cfg, run_id=args.run_id, resume=resume, sweep=sweep, fork=fork, group=args.group)


def _check_starts(args: argparse.Namespace) -> None:
    """The ways a run may start (a config, --resume, --fork) and what goes with each; mistakes name the flags."""
    from runtime.errors import ConfigError

    if args.run_id and args.resume:
        raise ConfigError("--run-id and --resume are exclusive (--resume keeps the run's id)")
    if not args.resume and (args.from_checkpoint is not None or args.from_approved):
        raise ConfigError("--from-checkpoint and --from-approved choose where --resume RUN_ID continues")
    if args.fork is not None and (args.resume or args.config is not None):
        raise ConfigError("--fork trains with the parent's config: leave out CONFIG and --resume; change it with --set")
    if args.force and args.fork is None:
        raise ConfigError("--force goes with --fork (a checkpoint the audit gate rejected)")
    if args.config is None and not args.resume and args.fork is None:
        raise ConfigError("a run config is needed, e.g. trainbus train configs/tiny.yaml")
    if args.seeds is not None and (args.seeds < 1 or args.resume):
        raise ConfigError("--seeds N: at least 1, and not with --resume (a resumed run keeps its seed)")


def _config_of(args: argparse.Namespace) -> tuple[Any, Any]:
    """The run's config, and the fork to make (None unless --fork)."""
    from producers.config import RunConfig
    from producers.run.arguments import check_training
    from producers.run.fork import Forking, fork_config
    from producers.run.resume import restore_config

    if args.resume:
        return restore_config(args.config, args.overrides, args.resume, check=check_training), None
    if args.fork is not None:
        here = load_config(RunConfig, None, [o for o in args.overrides if o.startswith(("bus.", "log.", "state_dir"))])
        cfg, parent = fork_config(here, args.fork, args.overrides, check=check_training)
        return cfg, Forking(args.fork, args.force, parent)
    return load_config(RunConfig, args.config, args.overrides, check=check_training), None


def quiet_libraries(cfg: Any) -> None:
    """No progress bars from transformers and the hub off a terminal, nor for the tiny model (it
    saves and loads in a blink); a real model's download and load keep theirs on a terminal."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    if not console_output(cfg.log.format) or cfg.model.name_or_path == "tiny":
        hf_logging.disable_progress_bar()
        disable_progress_bars()


def _sweep_tag(name: str | None, trial: int | None) -> SweepTag | None:
    from pydantic import ValidationError

    from runtime.errors import ConfigError

    if name is None and trial is None:
        return None
    if name is None or trial is None:
        raise ConfigError("--sweep NAME and --trial K go together")
    try:
        return SweepTag(name=name, trial=trial)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--sweep" if err["loc"][0] == "name" else "--trial"
        raise ConfigError(f"{flag}: {err['msg']}") from None


def register_sample_data(sub: Any) -> None:
    p = sub.add_parser("sample-data", help="write the deterministic sample data set (train/validation/test JSONL)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_data)


def cmd_sample_data(args: argparse.Namespace) -> int:
    from producers.task.sampledata import write_sample_data

    paths = write_sample_data(args.out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path} ({sum(1 for _ in path.open())} rows)")
    return 0
