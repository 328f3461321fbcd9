"""`trainbus train --resume` picks its checkpoint or says, in one line, why it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.run.resume import Saved, choose_checkpoint, restore_config
from runtime.checkpoints import fingerprint
from runtime.errors import BusUnavailable, ConfigError, NotFound
from schemas import Checkpoint


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "r1"
    for step in (10, 20, 30):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / "checkpoint-notes").mkdir()  # not a step: ignored
    return folder


def test_the_latest_or_the_named_checkpoint(run_dir: Path) -> None:
    latest = choose_checkpoint("r1", run_dir, None)
    assert (latest.step, latest.path.name, latest.verdicts_known) == (30, "checkpoint-30", False)
    named = choose_checkpoint("r1", run_dir, Saved(), from_step=20)
    assert (named.step, named.verdict, named.verdicts_known) == (20, None, True)


@pytest.mark.parametrize(
    ("kwargs", "verdicts", "error", "says"),
    [
        ({"from_step": 25}, None, NotFound, "--from-checkpoint 25: no checkpoint-25 in {dir} (steps: 10, 20, 30)"),
        ({"from_approved": True}, None, BusUnavailable, "--from-approved: the bus cannot be reached to read the audit gate's verdicts"),
        ({"from_approved": True}, Saved(), NotFound, "--from-approved: the audit gate approved none of the checkpoints of r1 (steps 10, 20, 30)"),
    ],
)  # fmt: skip
def test_a_checkpoint_that_cannot_be_chosen_is_named(
    run_dir: Path, kwargs: dict[str, object], verdicts: Saved | None, error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as info:
        choose_checkpoint("r1", run_dir, verdicts, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == says.format(dir=run_dir)


def test_a_checkpoint_whose_files_changed_since_its_event_is_refused(run_dir: Path) -> None:
    folder = run_dir / "checkpoint-30"
    (folder / "adapter_model.safetensors").write_bytes(b"as saved")
    announced = fingerprint(folder)[0]
    event = Checkpoint(
        event_id="r1.1.40", run_id="r1", seq=40, step=30, path=str(folder), sha256=announced, size_bytes=8
    )
    assert choose_checkpoint("r1", run_dir, Saved(checkpoints={30: event})).step == 30
    (folder / "adapter_model.safetensors").write_bytes(b"rewritten")
    with pytest.raises(ConfigError) as refused:
        choose_checkpoint("r1", run_dir, Saved(checkpoints={30: event}))
    now = fingerprint(folder)[0]
    assert str(refused.value) == (
        f"--resume r1: {folder}: its files hash to sha256 {now[:12]}…, but its checkpoint event r1.1.40 "
        f"announced {announced[:12]}…: the files changed after the trainer saved them"
    )


def test_a_run_folder_without_checkpoints_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        choose_checkpoint("r1", tmp_path, None)
    assert str(info.value) == f"--resume r1: {tmp_path} has no checkpoint-* folder to continue from"


def test_a_missing_or_unreadable_run_file_is_named(tmp_path: Path) -> None:
    output = f"training.output_dir={tmp_path / 'runs'}"
    with pytest.raises(NotFound) as missing:
        restore_config(None, [output], "r1")
    assert str(missing.value).startswith(f"--resume r1: no run folder {tmp_path / 'runs' / 'r1'}")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "trainbus-run.json").write_text("{not json")
    with pytest.raises(ConfigError) as broken:
        restore_config(None, [output], "r1")
    assert "trainbus-run.json is not a run file trainbus can read" in str(broken.value)
