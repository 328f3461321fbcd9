"""CLI commands of the trainer: `trainbus train` and `trainbus sample-data` (entry-point plugins)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.logs import setup_logging
from runtime.settings import load_config


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
    p.add_argument(
        "--offline-ok",
        action="store_true",
        help="train even when the bus is unreachable: events wait in the run's outbox and are sent once it connects",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from producers.config import RunConfig
    from runtime.errors import ConfigError

    cfg = load_config(RunConfig, args.config, args.overrides)
    setup_logging(cfg.log.level, cfg.log.format)
    if args.offline_ok:
        cfg.publish.offline_ok = True
    if args.run_id and args.resume:
        raise ConfigError("--run-id and --resume are exclusive (--resume keeps the run's id)")
    from producers.train import run

    return run(cfg, run_id=args.run_id, resume=args.resume)


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
