"""An agent's slots and what it starts a trainer with: the rules behind `trainbus agent`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from consumers.launch.slots import Slots, cuda_devices
from consumers.launch.trainer import config_file, outcome, thread_share, train_argv, trainer_env
from runtime.launch.queue import waiting_order
from schemas.jobs import JobRecord, JobSpec


def spec(job: str = "j-aaaa1", *, slots: int = 1, priority: str = "normal", **extra: object) -> JobSpec:
    return JobSpec(job_id=job, run_id=f"run-{job}", config_name="configs/tiny.yaml", config_yaml="run_name: x\n",
                   slots=slots, priority=priority, **extra)  # type: ignore[arg-type]  # fmt: skip


def test_an_agent_takes_a_job_that_fits_waits_for_one_that_will_and_leaves_one_that_never_can() -> None:
    agent = Slots.of(2, None, {"gpu": "a100"})
    assert agent.decide(spec(slots=2)) == "take"
    agent.hold("j-busy1", 1)
    assert agent.decide(spec(slots=1)) == "take"
    assert agent.decide(spec(slots=2)) == "wait"  # once the running job ends
    assert agent.decide(spec(slots=3)) == "leave"  # more than it has
    assert agent.decide(spec(requires={"gpu": "h100"})) == "leave"
    assert agent.decide(spec(requires={"gpu": "a100"})) == "take"
    agent.release("j-busy1")
    assert agent.free == 2


def test_each_job_gets_its_own_gpus_and_sees_only_them() -> None:
    agent = Slots.of(None, [0, 1])
    assert agent.total == 2
    first, second = agent.hold("j-first1", 1), agent.hold("j-second", 1)
    assert (first, second) == ([0], [1])
    assert cuda_devices(first) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert cuda_devices([]) == {}  # CPU slots: nothing to hide
    agent.release("j-first1")
    assert agent.hold("j-third1", 1) == [0]


def test_waiting_jobs_go_by_priority_then_submission_order() -> None:
    records = [
        JobRecord(spec=spec("j-low01", priority="low"), queue_seq=1),
        JobRecord(spec=spec("j-norm1"), queue_seq=2),
        JobRecord(spec=spec("j-high1", priority="high"), queue_seq=3),
        JobRecord(spec=spec("j-norm2"), queue_seq=4, state="requeued"),
        JobRecord(spec=spec("j-run01"), queue_seq=0, state="running"),
    ]
    assert [r.spec.job_id for r in waiting_order(records)] == ["j-high1", "j-norm1", "j-norm2", "j-low01"]


def test_a_job_trains_fresh_then_resumes_and_runs_under_torchrun_with_slots(tmp_path: Path) -> None:
    argv = train_argv(spec(overrides=["training.max_steps=5"]), tmp_path / "c.yaml", resume=False)
    config = str(tmp_path / "c.yaml")
    assert argv[-6:] == ["train", config, "--run-id", "run-j-aaaa1", "--set", "training.max_steps=5"]
    assert train_argv(spec(), tmp_path / "c.yaml", resume=True)[-3:] == ["train", "--resume", "run-j-aaaa1"]
    two = train_argv(spec(slots=2), tmp_path / "c.yaml", resume=False)
    assert "torchrun" in Path(two[0]).name and two[1:5] == ["--standalone", "--nproc_per_node", "2", "-m"]


def test_the_trainer_connects_as_trainer_with_its_job_and_a_share_of_the_cores() -> None:
    environ = {"NATS_USER": "agent", "NATS_PASSWORD": "a-secret", "TRAINBUS_TRAINER_PASSWORD": "t-secret", "HOME": "/h"}
    env = trainer_env(environ, servers="nats://h:4222", job_id="j-aaaa1", agent_id="a1", gpus=[1], threads=None)
    assert env["NATS_USER"] == "trainer" and env["NATS_PASSWORD"] == "t-secret"
    assert env["NATS_URL"] == "nats://h:4222" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert (env["TRAINBUS_JOB"], env["TRAINBUS_AGENT"], env["HOME"]) == ("j-aaaa1", "a1", "/h")
    plain = trainer_env({"NATS_TOKEN": "tok"}, servers="s", job_id="j-aaaa1", agent_id="a1", gpus=[], threads=4)
    assert plain["NATS_TOKEN"] == "tok" and plain["OMP_NUM_THREADS"] == "4" and "CUDA_VISIBLE_DEVICES" not in plain
    assert thread_share(16, 1, 4, has_gpus=False) == 4
    assert thread_share(2, 1, 4, has_gpus=False) == 1
    assert thread_share(16, 1, 2, has_gpus=True) is None


def test_a_shipped_config_is_read_where_it_lives_and_another_from_a_copy(tmp_path: Path) -> None:
    shipped = Path("configs/tiny.yaml")
    same = spec().model_copy(update={"config_yaml": shipped.read_text()})
    assert config_file(same, tmp_path) == shipped.resolve()  # so its labels.yaml resolves beside it
    edited = spec().model_copy(update={"config_yaml": "run_name: edited\n"})
    copy = config_file(edited, tmp_path)
    assert copy.parent == tmp_path and copy.read_text() == "run_name: edited\n"


def test_a_trainer_exit_says_why_the_job_failed() -> None:
    assert outcome(2, "trainbus train: data.train_file: no such file") == (
        "failed",
        "trainbus train: data.train_file: no such file",
    )
    assert outcome(-9, "") == ("failed", "the trainer was killed by signal 9")
    assert outcome(1, "boom")[1] == "the trainer exited with code 1: boom"


def test_an_agent_heartbeat_says_how_old_it_is() -> None:
    from schemas.jobs import AgentStatus

    now = datetime.now(UTC)
    beat = AgentStatus(agent_id="a1", host="h", pid=1, slots=1, free=1, heartbeat_at=now - timedelta(seconds=7))
    assert 6.5 < beat.age(now) < 7.5
