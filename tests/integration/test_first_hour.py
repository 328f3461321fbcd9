"""`trainbus train` as a new user runs it: from another folder, with a TrainingArguments integration
beside trainbus, and `--resume` that continues the run as it was configured (its `--set` overrides
included), says from which checkpoint and what the audit gate thought of it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from runtime.bus.server import RunningServer
from runtime.cli.main import main
from schemas import AuditVerdict, Checkpoint, RunFinished, RunStarted
from tests.end_to_end.conftest import events_of, of_type

FAST = ["--set", "training.eval_steps=null", "--set", "data.validation_file=null", "--set", "training.logging_steps=2"]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_server: RunningServer) -> Path:
    """A folder that is not the repository, with nothing in it."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return folder


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_readme_command_works_from_another_folder_with_tensorboard_beside_trainbus(
    elsewhere: Path, nats_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = train(
        capsys, "configs/tiny.yaml", "--run-id", "anywhere", "--set", "training.max_steps=4",
        "--set", "training.save_steps=null", "--set", "training.report_to=[tensorboard]", *FAST,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "run anywhere (attempt 1) completed" in out
    assert (elsewhere / "runs/sample-data/train.jsonl").is_file()  # the sample set is written where it runs
    run_dir = elsewhere / "runs/anywhere"
    assert list(run_dir.glob("runs/*/events.out.tfevents.*")), "tensorboard wrote no event file"
    started = of_type(events_of(nats_server.url, "anywhere"), "run.started")[0]
    assert started.config["data"]["labels_file"].endswith("configs/labels.yaml")
    assert started.config["training"]["report_to"] == ["tensorboard"]
    # quiet: no JSON-less noise off a terminal, and none of the warnings nobody can act on
    for noise in ("Writing model shards", "tie_word_embeddings", "is_gradient_checkpointing", "{'loss'"):
        assert noise not in err
    assert all(line.startswith(("{", "trainbus:")) for line in err.splitlines()), err


def judge(url: str, run_id: str, verdicts: dict[int, str]) -> None:
    """Publish what the audit gate would have said of the run's checkpoints."""
    checkpoints: list[Checkpoint] = of_type(events_of(url, run_id), "checkpoint")

    async def publish() -> None:
        nc = await nats.connect(url)
        for seq, ckpt in enumerate(checkpoints, start=1):
            verdict = AuditVerdict(
                event_id=f"{run_id}.audit.verdict.{ckpt.event_id}", run_id=run_id, seq=seq, source="audit",
                checkpoint_event_id=ckpt.event_id, checkpoint_step=ckpt.step, checkpoint_path=ckpt.path,
                verdict="approved" if verdicts[ckpt.step] == "approved" else "rejected",
                reasons=[] if verdicts[ckpt.step] == "approved" else ["accuracy_floor (warning): accuracy was 0 at step 8"],
            )  # fmt: skip
            data = verdict.model_dump_json().encode()
            await nc.jetstream().publish(
                f"trainbus.events.{run_id}.audit.verdict", data, headers={"Nats-Msg-Id": verdict.event_id}
            )
        await nc.close()

    asyncio.run(publish())


def test_resume_continues_the_run_as_configured_from_the_checkpoint_it_names(
    elsewhere: Path, nats_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run = "resumed"
    args = ["configs/tiny.yaml", "--set", "training.max_steps=8", "--set", "training.save_steps=4", *FAST]
    code, _, err = train(capsys, *args, "--run-id", run)
    assert code == 0, err[-3000:]
    judge(nats_server.url, run, {4: "approved", 8: "rejected"})

    # from its newest checkpoint, which the audit gate rejected: it says so, and trains on as asked
    code, _, err = train(capsys, "configs/tiny.yaml", "--resume", run, "--set", "training.max_steps=10")
    assert code == 0, err[-3000:]
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    resuming = next(line for line in lines if line["event"] == "resuming")
    assert (resuming["step"], resuming["verdict"]) == (8, "rejected")
    assert resuming["checkpoint"].endswith("runs/resumed/checkpoint-8")
    warning = next(line for line in lines if line["level"] == "warning")
    assert warning["event"].startswith("the audit gate rejected this checkpoint; --from-approved")
    assert warning["reasons"] == ["accuracy_floor (warning): accuracy was 0 at step 8"]

    # no config named: the run's own, as it last trained (10 steps), not the YAML's 600
    code, _, err = train(capsys, "--resume", run, "--from-approved")
    assert code == 0, err[-3000:]
    third = [e for e in events_of(nats_server.url, run) if e.attempt == 3]
    started = next(e for e in third if isinstance(e, RunStarted))
    finished = next(e for e in third if isinstance(e, RunFinished))
    assert (started.resumed_from_step, started.max_steps, finished.step) == (4, 10, 10)
    assert started.config["training"]["max_steps"] == 10
    assert [s.step for s in third if s.type == "train.step"] == [6, 8, 10]

    code, _, err = train(capsys, "--resume", run, "--from-checkpoint", "5")
    assert code == 2
    steps = ", ".join(
        p.name.split("-")[1]
        for p in sorted((elsewhere / "runs" / run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    )
    assert err.strip().splitlines()[-1] == (
        f"trainbus train: --from-checkpoint 5: no checkpoint-5 in runs/{run} (steps: {steps})"
    )
    code, _, err = train(capsys, "--resume", run)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"trainbus train: --resume {run}: checkpoint-10 is already at training.max_steps (10); "
        "--set training.max_steps=N (more than 10) to train on"
    )
