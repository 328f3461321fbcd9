"""`trainbus train CONFIG --seeds N`: N runs that differ only in ``training.seed``, one group.

    trainbus train configs/tiny.yaml --seeds 3 --set adapter.r=16 --run-id r16

trains ``r16-s42``, ``r16-s43`` and ``r16-s44`` one after another (the config's seed, then the next
ones), each an ordinary run whose ``run.started`` names the group (``r16``), so "is this change
real or noise" is one command and one chart: the Compare page and `trainbus runs --group-by group`
show the group's mean and spread. Works with ``--fork`` too (each seed forks the same checkpoint).
Exits with the worst exit code of its runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from schemas import check_run_id


def seed_runs(base: str, first_seed: int, n: int) -> list[tuple[str, int]]:
    """(run id, seed) of each run of the group: ``<base>-s<seed>``."""
    return [(check_run_id(f"{base}-s{seed}"), seed) for seed in range(first_seed, first_seed + n)]


def argv_of(args: argparse.Namespace, run_id: str, seed: int, group: str) -> list[str]:
    """`trainbus train` for one seed: the same config, fork and overrides, this seed, this group."""
    argv = [sys.executable, "-m", "runtime.cli", "train"]
    argv += [args.config] if args.config is not None else []
    argv += ["--fork", str(args.fork)] if args.fork is not None else []
    argv += ["--force"] if args.force else []
    argv += ["--offline-ok"] if args.offline_ok else []
    argv += ["--run-id", run_id, "--group", group]
    for item in [*args.overrides, f"training.seed={seed}"]:
        argv += ["--set", item]
    return argv


def train_seeds(cfg: Any, args: argparse.Namespace) -> int:
    base = check_run_id(args.run_id or f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    worst = 0
    for run_id, seed in seed_runs(base, cfg.training.seed, args.seeds):
        print(f"trainbus train: {run_id} (training.seed={seed}, group {base})", flush=True)
        worst = max(worst, subprocess.run(argv_of(args, run_id, seed, base), check=False).returncode)
    print(
        f"trainbus train: group {base} of {args.seeds} runs: `trainbus runs --group-by group` compares them", flush=True
    )
    return worst
