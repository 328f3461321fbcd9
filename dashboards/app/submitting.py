"""What the New run page submits: the configs it offers, the `trainbus submit` command it runs,
and what that command said (pure, tested without Streamlit).

The page runs `trainbus submit` itself rather than queueing from the dashboard's process: the
config is then checked by the trainer's own code (every mistake named, as on the command line)
and the dashboard never imports the trainer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import PROJECT_ROOT

NOT_RUN_CONFIGS = {"labels.yaml", "audit.yaml", "predict.yaml"}
"""Files in configs/ that are not run configs."""
SUBMIT_TIMEOUT = 120.0
_QUEUED = re.compile(r"queued job (?P<job>j-[a-z0-9]+) for run (?P<run>[A-Za-z0-9_-]+)")


def run_configs(root: Path = PROJECT_ROOT) -> list[str]:
    """The run configs shipped in ``configs/`` (presets included), as `trainbus submit` names them."""
    found = [p for p in (root / "configs").rglob("*.yaml") if p.name not in NOT_RUN_CONFIGS]
    skip = {"sweeps", "nats"}
    return sorted(str(p.relative_to(root)) for p in found if not skip & set(p.relative_to(root / "configs").parts))


@dataclass(frozen=True)
class Submitted:
    """What `trainbus submit` said: the job and run ids, or its one-line error."""

    ok: bool
    job_id: str = ""
    run_id: str = ""
    message: str = ""


def submit_argv(config: str | None, overrides: list[str], *, slots: int, priority: str, run_id: str = "") -> list[str]:
    """`trainbus submit` (``config`` None: a fork, which trains with its parent's config)."""
    head = [sys.executable, "-m", "runtime.cli", "submit", *([config] if config else [])]
    argv = [*head, "--slots", str(slots), "--priority", priority]
    if run_id:
        argv += ["--run-id", run_id]
    for item in overrides:
        argv += ["--set", item]
    return argv


def overrides_of(text: str) -> list[str]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments skipped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def pasted_config(text: str, folder: Path) -> Path:
    """Write pasted YAML where `trainbus submit` can read it; relative paths in it resolve from ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pasted-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return path


def said(result: subprocess.CompletedProcess[str]) -> Submitted:
    """The job and run ids from `trainbus submit`'s output, or its error line."""
    found = _QUEUED.search(result.stdout)
    if result.returncode == 0 and found:
        return Submitted(True, found["job"], found["run"], result.stdout.strip())
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return Submitted(False, message=(lines[-1] if lines else f"trainbus submit exited with {result.returncode}"))


def submit(argv: list[str]) -> Submitted:
    try:
        return said(subprocess.run(argv, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT, check=False))
    except subprocess.TimeoutExpired:
        return Submitted(False, message=f"trainbus submit did not answer within {SUBMIT_TIMEOUT:.0f}s")
