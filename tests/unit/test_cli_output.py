"""What a user reads: log lines (JSON off a terminal, run id bound, secrets masked, level honoured)
and `trainbus sample-data DIR`, the command the README gives for a first data set; `train` flags
that contradict each other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from runtime.cli.main import main
from runtime.cli.notes import tag_message
from runtime.logs import get_logger, setup_logging


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    yield capsys
    structlog.reset_defaults()  # the next test configures its own


def test_log_lines_are_json_with_the_run_bound_and_secrets_masked(logs: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    log = get_logger(run_id="r1")
    log.info("connecting", password="s3cret", nats_token="t0k", creds_file="/keys/a.creds", servers="nats://h:1")
    log.debug("too detailed for info")
    out = logs.readouterr()
    assert out.out == ""  # stdout stays for command output
    [line] = out.err.splitlines()
    record = json.loads(line)
    assert record["event"] == "connecting" and record["run_id"] == "r1" and record["level"] == "info"
    assert record["password"] == record["nats_token"] == record["creds_file"] == "***"
    assert record["servers"] == "nats://h:1"
    assert "s3cret" not in out.err and "t0k" not in out.err


def test_console_format_and_debug_level(logs: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug", "console")
    get_logger(run_id="r2").debug("step done", step=3, secret="x9x9")
    err = logs.readouterr().err
    assert "step done" in err and "run_id=r2" in err and "step=3" in err
    assert "x9x9" not in err and not err.lstrip().startswith("{")


def test_sample_data_command_writes_the_three_splits_and_says_so(
    logs: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["sample-data", str(tmp_path / "data"), "--seed", "3"]) == 0
    lines = logs.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "validation", "test"]
    for line, split in zip(lines, ("train", "validation", "test"), strict=True):
        path = tmp_path / "data" / f"{split}.jsonl"
        rows = path.read_text().splitlines()
        assert line == f"{split}: {path} ({len(rows)} rows)"
        assert all(json.loads(row)["text"] for row in rows)
    again = tmp_path / "again"
    assert main(["sample-data", str(again), "--seed", "3"]) == 0
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "data" / "train.jsonl").read_bytes()


def test_train_with_both_run_id_and_resume_is_refused_in_one_line(logs: pytest.CaptureFixture[str]) -> None:
    repo = Path(__file__).resolve().parents[2]
    assert main(["train", str(repo / "configs/tiny.yaml"), "--run-id", "a", "--resume", "b"]) == 2
    err = logs.readouterr().err
    assert err == "trainbus train: --run-id and --resume are exclusive (--resume keeps the run's id)\n"


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        ({"team": "risk"}, "tagged run r1: team=risk"),
        ({"team": ""}, "removed tag team from run r1"),
        ({"team": "", "dataset": ""}, "removed tags team dataset from run r1"),
        ({"team": "risk", "dataset": ""}, "tagged run r1: team=risk; removed tag dataset"),
    ],
)
def test_tag_says_what_it_set_and_what_it_removed(tags: dict[str, str], says: str) -> None:
    assert tag_message("r1", tags) == says
