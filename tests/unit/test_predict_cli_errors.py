"""A user's mistakes with `trainbus serve` and `trainbus predict` get one line naming what to
fix and exit 2, before anything connects to a bus or loads a model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from runtime.cli.main import main


@pytest.mark.parametrize(
    ("argv", "stdin", "says"),
    [
        (["serve"], "", "trainbus serve: --run: which run to serve? (or set serve.run in --config)"),
        (["serve", "--run", "r", "--max-batch", "0"], "", "trainbus serve: serve (flags over --config): max_batch: Input should be greater than or equal to 1"),
        (["predict", "hello"], "", "trainbus predict: --alias: which served model? (trainbus predict --list shows them)"),
        (["predict", "--alias", "risk"], "", "trainbus predict: no text to classify (give TEXT arguments, or - to read lines from stdin)"),
        (["predict", "--alias", "risk", "-"], "\n  \n", "trainbus predict: no text to classify (give TEXT arguments, or - to read lines from stdin)"),
        (["predict", "--alias", "risk", "--metadata", "tags=[1, 2]", "hi"], "", "trainbus predict: --metadata 'tags=[1, 2]': the value must be a string, number or boolean"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_and_exit_2(
    argv: list[str],
    stdin: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/predict.yaml, no .trainbus folder here
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.strip() == says and not out
