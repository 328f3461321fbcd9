"""CLI commands of the trainer: `trainbus train` and `trainbus sample-data` (entry-point plugins)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.logs import setup_logging
from runtime.settings import load_config
from schemas import SweepTag


def register_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune with a LoRA-family adapter and stream the run to the bus")
    p.add_argument("config", help="run config YAML, e.g. configs/tiny.yaml")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override a config key, e.g. training.max_steps=40",
    )
    p.add_argument("--run-id", help="choose the run id (default: <run_name>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue RUN_ID from its last checkpoint (attempt + 1)")
    p.add_argument("--sweep", metavar="NAME", help="tag run.started as a trial of sweep NAME (set by `trainbus sweep`)")
    p.add_argument("--trial", metavar="K", type=int, help="with --sweep: the trial number")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from producers.config import RunConfig
    from runtime.errors import ConfigError

    cfg = load_config(RunConfig, args.config, args.overrides)
    setup_logging(cfg.log.level, cfg.log.format)
    if args.run_id and args.resume:
        raise ConfigError("--run-id and --resume are exclusive (--resume keeps the run's id)")
    from producers.train import run

    return run(cfg, run_id=args.run_id, resume=args.resume, sweep=_sweep_tag(args.sweep, args.trial))


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
    from producers.sampledata import write_sample_data

    paths = write_sample_data(args.out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path} ({sum(1 for _ in path.open())} rows)")
    return 0
