"""Bad input to `trainbus train`: one clear line, exit 2 (3 for the bus), nothing trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runtime.bus.server import RunningServer
from runtime.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_server: RunningServer) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return tmp_path


def train(*args: str) -> int:
    return main(["train", "configs/tiny.yaml", "--set", "training.max_steps=2", *args])


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("trainbus")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "training.learning_rate=0"], "training.learning_rate: Input should be greater than 0"),
        (["--set", "adapter.method=qlora"], "adapter.method: Input should be 'lora', 'dora' or 'adalora'"),
        (["--set", "model.quantization=4bit"], "model.quantization: 4bit"),
        (["--set", "model.name_or_path=./no/such/model"], "model.name_or_path: './no/such/model'"),
        (["--run-id", "bad.id"], "--run-id: invalid run id"),
        (["--resume", "never-ran"], "--resume never-ran: no run folder"),
    ],
)
def test_bad_config_fails_before_training(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code = train(*args)
    assert code == 2
    assert expected in one_line(capsys.readouterr().err)
    assert not list((workdir / "runs").glob("*/checkpoint-*"))


def test_label_outside_labels_yaml_names_file_and_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = workdir / "bad.jsonl"
    data.write_text('{"text": "fine", "label": "NO_RISK"}\n{"text": "hmm", "label": "PURPLE"}\n')
    assert train("--set", f"data.train_file={data}") == 2
    assert f"{data}:2: field 'label': 'PURPLE' is not one of" in one_line(capsys.readouterr().err)
    assert (
        train(
            "--set",
            f"data.train_file={data}",
            "--set",
            "data.skip_invalid=true",
            "--set",
            "data.validation_file=null",
            "--set",
            "training.eval_steps=null",
            "--set",
            "training.save_steps=null",
            "--set",
            "publish.enabled=false",
        )
        == 0
    )


def test_empty_data_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = workdir / "empty.jsonl"
    empty.write_text("")
    assert train("--set", f"data.train_file={empty}") == 2
    assert "empty.jsonl: no examples" in one_line(capsys.readouterr().err)


def test_output_dir_that_cannot_hold_checkpoints(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = workdir / "not-a-dir"
    blocker.write_text("")
    assert train("--set", f"training.output_dir={blocker}") == 2
    assert "training.output_dir: cannot write checkpoints" in one_line(capsys.readouterr().err)


def test_unreachable_bus_exits_3_before_loading_the_model(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    assert train("--set", "bus.connect_timeout=1") == 3
    line = one_line(capsys.readouterr().err)
    assert "nats://127.0.0.1:1" in line and "trainbus up" in line
