"""``python -m runtime.publish.upload RUN STEP SHA256 FOLDER``: put one checkpoint folder in the
bus's object store (``runtime.bus.objects``), in a process of its own.

A trainer starts it after announcing a checkpoint, so the upload never holds up a training step
nor the run's events, and it finishes even when the training process ends right after its last
save. It finds the bus as every command does (``NATS_URL``, the folder's bus), never starts one,
says in one log line what it did, and exits 0 when the checkpoint is in the bucket.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from runtime.bus.connect import BusTarget, connected, resolve_target
from runtime.bus.objects import BUS_ERRORS, checkpoint_store, upload
from runtime.errors import TrainbusError
from runtime.logs import get_logger, setup_logging
from runtime.settings import Settings, load_config


def argv(run_id: str, step: int, sha256: str, folder: Path) -> list[str]:
    """The command that uploads ``folder`` (for a trainer to start)."""
    return [sys.executable, "-m", "runtime.publish.upload", run_id, str(step), sha256, str(folder)]


class Uploader:
    """Starts an upload process per announced checkpoint, on the bus at ``servers``; its log lines go
    to ``log`` (the run folder's ``upload.log``). It never waits for one: a run may end before its
    last checkpoint is up, and the upload goes on."""

    def __init__(self, servers: list[str], log: Path) -> None:
        self.servers = servers
        self.log = log
        self.started: list[subprocess.Popen[bytes]] = []

    def __call__(self, run_id: str, step: int, sha256: str, folder: Path) -> None:
        env = {**os.environ, "NATS_URL": ",".join(self.servers)}
        with self.log.open("ab") as out:
            upload = subprocess.Popen(
                argv(run_id, step, sha256, folder), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        self.started.append(upload)
        self.started = [p for p in self.started if p.poll() is None]


async def _upload(target: BusTarget, settings: Settings, run_id: str, step: int, sha256: str, folder: Path) -> int:
    async with connected(target, settings, name=f"trainbus-upload-{run_id}") as nc:
        obs = await checkpoint_store(nc.jetstream(), settings.stream.objects_max_bytes, settings.stream.replicas)
        return (await upload(obs, folder, run_id, step, sha256)).size


def main(args: list[str]) -> int:
    run_id, step, sha256, folder = args[0], int(args[1]), args[2], Path(args[3])
    settings = load_config(Settings)
    setup_logging(settings.log.level, "json")
    log = get_logger(component="checkpoint-upload", run_id=run_id, step=step)
    try:
        target = resolve_target(settings, announce=False, start=False)
        size = asyncio.run(_upload(target, settings, run_id, step, sha256, folder))
    except (TrainbusError, *BUS_ERRORS) as exc:
        log.warning("checkpoint not uploaded; it stays on this machine", folder=str(folder), error=str(exc) or type(exc).__name__)  # fmt: skip
        return 1
    log.info("checkpoint uploaded to the bus", folder=str(folder), bytes=size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
