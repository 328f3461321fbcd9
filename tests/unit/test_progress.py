"""What `trainbus train` prints while it trains: a bar with steps, loss and time left on a terminal
(log lines printed above it, never through it), JSON lines without one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from transformers import TrainerControl, TrainerState, TrainingArguments

from producers.run.progress import Progress, bar, duration
from runtime.logs import get_logger, setup_logging, status


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore() -> Iterator[None]:
    yield
    status.clear()
    structlog.reset_defaults()


def test_the_bar_shows_steps_loss_and_time_left() -> None:
    assert bar(120, 400, 0.41234, 65) == "step 120/400 [#######-----------------]  30%  loss 0.4123  1m05s left"
    assert bar(0, 400, None, None) == "step 0/400 [------------------------]   0%"
    assert [duration(s) for s in (9, 65, 3725)] == ["9s", "1m05s", "1h02m"]


def test_log_lines_print_above_the_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, restore: None) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)  # here: pytest sets its own stderr between setup and call
    setup_logging("info", "auto")  # a terminal: readable lines, not JSON
    status.show("step 1/4 [######------------------]  25%")
    get_logger(run_id="r1").info("evaluated", step=1, loss=0.5)
    status.clear()
    drawn = "step 1/4 [######------------------]  25%\x1b[K"
    screen = terminal.getvalue()
    assert screen.startswith(f"\r{drawn}\r\x1b[K") and screen.endswith(f"\n{drawn}\r\x1b[K")  # redrawn, then cleared
    line = screen[len(f"\r{drawn}\r\x1b[K") : -len(f"\n{drawn}\r\x1b[K")]
    assert "evaluated" in line and "loss=0.5" in line and "run_id=r1" in line and not line.startswith("{")


def test_without_a_terminal_progress_is_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "auto")  # pytest's captured stderr is no terminal
    try:
        progress = Progress(get_logger(run_id="r1"), terminal=False)
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        state, control = TrainerState(global_step=10, max_steps=40), TrainerControl()
        progress.on_train_begin(args, state, control)
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={"loss": 0.5, "learning_rate": 1e-3, "grad_norm": 2.0})
        metrics = {"eval_loss": 0.123456, "eval_accuracy": 0.9, "eval_runtime": 1.0}
        progress.on_evaluate(args, state, control, metrics=metrics)
        progress.on_save(args, state, control)
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["event"], r["step"]) for r in lines] == [("step", 10), ("evaluated", 10), ("checkpoint saved", 10)]
    assert (lines[0]["loss"], lines[0]["max_steps"]) == (0.5, 40)
    assert (lines[1]["loss"], lines[1]["accuracy"]) == (0.1235, 0.9) and "runtime" not in lines[1]
    assert lines[2]["path"] == f"{tmp_path}/checkpoint-10"
