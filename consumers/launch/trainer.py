"""Starting a job's trainer: the `trainbus train` command line, its environment, its log, and what
its exit means for the job.

A job runs ``trainbus train CONFIG --run-id RUN`` the first time and ``trainbus train --resume
RUN`` when it starts again after a lost agent or a requeue (the next attempt, from the latest
checkpoint); a sweep's trial adds ``--sweep NAME --trial K`` to both. With more than one slot it
runs under ``torchrun --nproc_per_node N``. The trainer sees only the job's GPUs
(``CUDA_VISIBLE_DEVICES``), a share of the machine's cores on CPU slots, the bus its agent uses,
the ``trainer`` role's credentials when ``TRAINBUS_TRAINER_PASSWORD`` is set, and
``TRAINBUS_JOB``/``TRAINBUS_AGENT``, by which it knows whose lease it trains under.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consumers.launch.slots import cuda_devices
from runtime.settings import packaged
from schemas.jobs import JobSpec, JobStateName

CREDENTIALS = ("NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY")


def config_file(spec: JobSpec, folder: Path) -> Path:
    """Where the job's config is read from: the file it was submitted as, when this machine has the
    same one (trainbus's own ``configs/…``: paths written in it, like ``labels.yaml``, then resolve
    beside it as they did for the submitter); else a copy of its text in ``folder``."""
    here = Path(packaged(spec.config_name))
    try:
        if here.read_text() == spec.config_yaml:
            return here.resolve()
    except OSError:
        pass
    copy = folder / "config.yaml"
    copy.write_text(spec.config_yaml)
    return copy


def train_argv(spec: JobSpec, config_file: Path, *, resume: bool) -> list[str]:
    """The command that trains ``spec``: fresh, or the next attempt of its run."""
    head = [sys.executable, "-m", "runtime.cli"]
    if spec.slots > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        head = [torchrun, "--standalone", "--nproc_per_node", str(spec.slots), "-m", "runtime.cli"]
    argv = [*head, "train", *_start(spec, config_file, resume=resume)]
    if spec.sweep is not None:  # every attempt of a trial says which trial it is
        argv += ["--sweep", spec.sweep.name, "--trial", str(spec.sweep.trial)]
    for item in spec.overrides:
        argv += ["--set", item]
    return argv


def _start(spec: JobSpec, config_file: Path, *, resume: bool) -> list[str]:
    """How the trainer starts: the next attempt of the run, a fork of another run, or the config."""
    if resume:
        return ["--resume", spec.run_id]
    start = ["--fork", spec.fork, *(["--force"] if spec.force else [])] if spec.fork else [str(config_file)]
    return [*start, "--run-id", spec.run_id, *(["--group", spec.group] if spec.group else [])]


def trainer_env(
    environ: Mapping[str, str], *, servers: str, job_id: str, agent_id: str, gpus: list[int], threads: int | None
) -> dict[str, str]:
    """The trainer's environment: the agent's, with the job's bus, role, GPUs and cores."""
    env = {k: v for k, v in environ.items() if k not in CREDENTIALS}
    env.update({"NATS_URL": servers, "TRAINBUS_JOB": job_id, "TRAINBUS_AGENT": agent_id, **cuda_devices(gpus)})
    password = environ.get("TRAINBUS_TRAINER_PASSWORD")
    if password:
        env.update({"NATS_USER": "trainer", "NATS_PASSWORD": password})
    else:  # no roles on this bus: the agent's own credentials, if any
        env.update({k: v for k, v in environ.items() if k in CREDENTIALS})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def thread_share(cpus: int, job_slots: int, agent_slots: int, has_gpus: bool) -> int | None:
    """Torch threads for a job on CPU slots: its share of the cores (None: leave torch's default)."""
    if has_gpus:
        return None
    return max(1, cpus * job_slots // agent_slots)


@dataclass
class Trainer:
    """A started trainer process and where its output goes."""

    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], log: Path) -> Trainer:
        """Start ``argv`` in a session of its own (a Ctrl-C of the agent's terminal does not reach it)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(process, log)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        """Signal the trainer's whole session (torchrun's ranks too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def error_line(self) -> str:
        """The trainer's own one-line error (``trainbus train: …``), else its last line of output."""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        mine = [line for line in lines if line.startswith("trainbus train:")]
        return (mine or lines or [""])[-1][:500]


def outcome(code: int, error: str) -> tuple[JobStateName, str]:
    """What a trainer's exit code means for its job when it did not finish cleanly: state, reason."""
    if code < 0:
        return "failed", f"the trainer was killed by signal {-code}"
    if code == 2:
        return "failed", error or "the trainer refused its config"
    return "failed", f"the trainer exited with code {code}" + (f": {error}" if error else "")
