"""Serve and export load a checkpoint quietly (#21.5): no progress bar and none of the warnings
expected for the tiny model's shape (tied embeddings in the adapter, untied by the merge, peft's
use of a deprecated transformers property), while any other warning is still shown."""

from __future__ import annotations

import os
import pty
import sys
import warnings
from pathlib import Path

import pytest

from consumers.predict.checkpoints import Chosen
from consumers.predict.quiet import quiet_loading, say_loading
from consumers.predict.serving import load_served
from producers.config import RunConfig
from producers.task.model import apply_adapter, load_model_and_tokenizer, prepare_base_model
from runtime.checkpoints import fingerprint
from runtime.settings import PROJECT_ROOT, load_config


@pytest.fixture
def checkpoint(tmp_path: Path) -> Chosen:
    """A tiny run's checkpoint as `trainbus train` saves it: the default adapter, embeddings included."""
    cfg = load_config(RunConfig, PROJECT_ROOT / "configs/tiny.yaml", environ={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building it warns too; only loading is under test
        model, _ = load_model_and_tokenizer(cfg.model, prepare_base_model(cfg.model, tmp_path, seed=0))
        apply_adapter(model, cfg.adapter, total_steps=10).save_pretrained(tmp_path / "checkpoint-1")
    folder = tmp_path / "checkpoint-1"
    return Chosen("quiet", 1, folder, fingerprint(folder)[0], "approved", False, cfg)


def test_loading_a_checkpoint_shows_no_bar_and_no_expected_warning_but_keeps_real_ones(
    checkpoint: Chosen, capfd: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_loading()
        served = load_served(checkpoint)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert served.ref.step == 1
    assert [str(w.message) for w in shown] == ["a real problem"]
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err


def test_on_a_terminal_one_line_of_our_own_stands_for_the_load(
    checkpoint: Chosen, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    say_loading("export", checkpoint)
    assert capsys.readouterr().out == ""  # not a terminal: the command's own result line is enough
    primary, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal, os.fdopen(primary, "rb", buffering=0) as screen:
        monkeypatch.setattr(sys, "stdout", terminal)
        say_loading("export", checkpoint)
        shown = screen.read(4096).decode()
    assert shown.splitlines() == [f"trainbus export: loading run quiet step 1 from {checkpoint.path} …"]
