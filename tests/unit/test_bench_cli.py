"""`trainbus bench --help` lists the benchmarks registered through the ``trainbus.benchmarks`` group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_help_lists_overhead_and_control() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "overhead" in done.stdout
    assert "control" in done.stdout


def test_cli_starts_without_loading_torch() -> None:
    # Every command registers through entry points; one that imports torch or transformers at
    # module level makes `trainbus events`, `ctl` and `runs` take seconds to start.
    probe = (
        "import sys\n"
        "from runtime.cli.main import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
