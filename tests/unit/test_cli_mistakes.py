"""Mistakes with `trainbus events`, `runs`, `tag`, `note` and `ctl` get one line naming what to fix and
exit 2, before anything connects to a bus."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.cli.main import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["events", "--run", "r1", "--csv", "--follow"], "trainbus events: --csv writes a finished table: leave out --follow"),
        (["runs", "--since", "yesterday"], "trainbus runs: argument --since: 'yesterday': use 30s, 10m, 2h, 1d or an ISO time like 2026-05-01T12:00 (see --help)"),
        (["tag", "r1", "novalue"], "trainbus tag: 'novalue': expected KEY=VALUE, e.g. dataset=v2"),
        (["note", "r1", "a" * 2001], "trainbus note: run.note: text: String should have at most 2000 characters"),
        (["ctl", "pause", "--run", "bad run!"], "trainbus ctl: --run: invalid run id 'bad run!': use 1-64 characters of A-Z a-z 0-9 _ -"),
        (["ctl", "pause", "--run", "r1", "lr=1"], "trainbus ctl: pause takes no KEY=VALUE arguments"),
        (["ctl", "set", "--run", "r1"], "trainbus ctl: set needs at least one KEY=VALUE, e.g. learning_rate=1e-5"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_and_exit_2(
    argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .trainbus folder: nothing to connect to either
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (a bad --since) exit from parsing
        code = exc.code
    assert code == 2
    out, err = capsys.readouterr()
    assert err.strip() == says and not out
    assert not (tmp_path / ".trainbus").exists()  # no embedded server was started for a mistake
