"""`make demo` is the first command a user types: `trainbus demo` end to end, without a terminal
(CI: it serves the run's approved best, asks it the README's examples and exits) and with one (it
keeps everything up until Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from runtime.cli.demo import ALIAS, EXAMPLES
from tests.conftest import REPO

OVERRIDES = [
    "training.max_steps=4", "training.logging_steps=1", "training.eval_steps=null", "training.save_steps=null",
    f"data.labels_file={REPO / 'configs/labels.yaml'}", "data.max_eval_samples=8",
]  # fmt: skip
JUDGED = [*OVERRIDES, "training.eval_steps=4", "training.save_steps=4"]  # one evaluated checkpoint, at the end
PERMISSIVE = f"""labels_file: {REPO / "configs/labels.yaml"}
best_metric: accuracy
rules:
  non_finite: {{severity: critical, actions: [flag, reject_checkpoint]}}
"""
"""A 4-step model is nowhere near the shipped rules' accuracy floor; the audit gate reads
configs/audit.yaml from the folder it runs in, so there these rules approve any finite checkpoint."""


@dataclass
class Demo:
    """A `trainbus demo` subprocess, its output so far and every process it started."""

    process: subprocess.Popen[str]
    err: Path
    lines: list[str] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        """Poll the demo's descendants (pid -> start time) until it exits."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            while not self.done.is_set():
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        self.seen.setdefault(child.pid, child.create_time())
                self.done.wait(0.1)

    def read_until(self, text: str) -> str:
        """Lines up to the one containing ``text`` (which is returned)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the demo ended without printing {text!r}: {self.output()[-3000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def left_behind(self) -> list[Any]:
        alive = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process.cmdline())
        return alive


@contextlib.contextmanager
def demo(tmp_path: Path, stdin: int | IO[Any], overrides: list[str] = OVERRIDES) -> Iterator[Demo]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env["OMP_NUM_THREADS"] = "1"  # one torch thread on a shared 2-core machine
    argv = [sys.executable, "-m", "runtime.cli", "demo", "--config", str(REPO / "configs/tiny.yaml")]
    for item in overrides:
        argv += ["--set", item]
    err = tmp_path / "demo.err"
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=err.open("w"), text=True,
        start_new_session=True,  # its own process group, as in a terminal, so a test can press Ctrl-C
    )  # fmt: skip
    running = Demo(process, err)
    watcher = threading.Thread(target=running.watch, daemon=True)
    watcher.start()
    try:
        yield running
    finally:
        running.done.set()
        watcher.join(10)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def health(line: str) -> int:
    """HTTP status of the health check of the dashboard a demo line names."""
    url = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    assert url is not None, line
    with urllib.request.urlopen(url.group(1) + "/_stcore/health", timeout=30) as reply:
        return int(reply.status)


def test_without_a_terminal_the_demo_trains_serves_its_best_asks_the_examples_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/audit.yaml").write_text(PERMISSIVE)
    with demo(tmp_path, subprocess.DEVNULL, JUDGED) as run:
        url_line = run.read_until("watch the run live in the dashboard:")
        assert health(url_line) == 200  # the printed URL answers while the run trains
        run.read_until("demo: stopped")
        assert run.process.wait(120) == 0, run.err.read_text()[-3000:]
    out = run.output()
    run_id = re.search(r"--run-id (demo-\d{8}-\d{6})", out)
    assert run_id is not None, out
    assert out.startswith("demo: using a local nats-server started for the demo at nats://127.0.0.1:")
    assert re.search(r"demo: started dashboard \(pid \d+\): trainbus dashboard: serving http://127\.0\.0\.1:\d+", out)
    assert out.index("watch the run live in the dashboard: http://127.0.0.1:") < out.index("demo: training:")
    assert f"/run?run={run_id.group(1)}" in out
    counts = dict(re.findall(r"([a-z.]+)=(\d+)", out.split("demo: events by type: ")[1].splitlines()[0]))
    assert (counts["run.started"], counts["run.finished"], counts["train.step"]) == ("1", "1", "4")
    assert "status=completed step=4" in out and "Ctrl-C" in out
    # the gate judged the checkpoint: the demo serves it and says where to ask it, then asks it itself
    assert "demo: serving the best approved checkpoint (step 4)" in out
    assert f"trainbus serve: serving run {run_id.group(1)} step 4 (approved" in out
    dashboard = re.search(r"dashboard: serving (http://127\.0\.0\.1:\d+)", out)
    assert dashboard is not None and f"Try-it page: {dashboard.group(1)}/tryit (alias {ALIAS})" in out
    asked = out.split("demo: asking the README's examples: trainbus predict --alias risk")[1].splitlines()
    assert asked[1].split() == ["TEXT", "DECISION", "P", "STEP", "RATIONALE"]
    answers = {text: next(line for line in asked if line.startswith(text)) for text, _ in EXAMPLES}
    for text, row in answers.items():  # a 4-step model: what it answers is not the point, that it does is
        decision, p, step = row[len(text) :].split()[:3]
        assert decision in ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK", "abstain") and step == "4", row
        assert 0 < float(p) <= 1
    assert out.index("asking the README's examples") < out.index("demo: stopped")
    assert re.search(r"demo: stopped \d+ service\(s\) and the bus", out)
    assert len(run.seen) >= 6  # the bus, the services, the trainer, the predictor, the question
    assert not run.left_behind()


def test_from_a_terminal_the_demo_stays_up_says_what_to_try_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    try:
        with demo(tmp_path, secondary) as run:
            url_line = run.read_until("watch the run live in the dashboard:")
            run.read_until("Things to try in the dashboard at http://127.0.0.1:")
            tips = run.read_until("trainbus ctl pause --run second")
            assert "NATS_URL=nats://127.0.0.1:" in tips
            assert run.process.poll() is None and health(url_line) == 200  # still up after the run
            os.killpg(run.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
            run.read_until("demo: stopped")
            assert run.process.wait(120) == 0, run.err.read_text()[-3000:]
        assert "status=completed step=4" in run.output()
        assert not run.left_behind()
    finally:
        os.close(primary)
        os.close(secondary)
