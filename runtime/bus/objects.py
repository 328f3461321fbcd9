"""Checkpoint folders over the bus: a JetStream object store bucket, so resuming on another machine
and serving on another host need no shared filesystem.

A checkpoint goes up as one object, ``<run_id>/checkpoint-<step>``: an uncompressed tar of the
folder, with the sha256 of its ``checkpoint`` event (``runtime.checkpoints.fingerprint``) in its
headers. An object is never replaced: the same checkpoint uploaded twice is a no-op, and other
files under a name already stored are refused (a checkpoint, once announced, never changes). A
fetched checkpoint is unpacked beside where it goes and checked against the sha256 its event
announced before it is moved into place; files that do not match are refused in one line.

Limits: the bucket holds ``objects_max_bytes`` in all (settings' ``stream`` section); a checkpoint
that does not fit is refused by the server and stays on the trainer's disk (the upload says so).
The object store cuts an object into 128 KiB chunks, so any single checkpoint up to the bucket's
size goes.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from runtime.bus.stream import PROVISION, auto_replicas
from runtime.checkpoints import fingerprint
from runtime.errors import BusUnavailable, ConfigError, NotFound
from schemas.subjects import CHECKPOINT_FILES_BUCKET

SHA_HEADER = "Trainbus-Checkpoint-Sha256"


@dataclass(frozen=True)
class Stored:
    """A checkpoint the bucket holds."""

    name: str
    sha256: str
    size: int


def object_name(run_id: str, step: int) -> str:
    return f"{run_id}/checkpoint-{step}"


async def checkpoint_store(js: JetStreamContext, max_bytes: int, replicas: int | None = None) -> ObjectStore:
    """The bucket, created when missing (its size limit is set once, when it is made).

    `trainbus up` creates it as admin; on a bus with roles a trainer only looks, and a user the
    server does not let create it is told so in one line."""
    try:
        return await js.object_store(CHECKPOINT_FILES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = api.ObjectStoreConfig(
        bucket=CHECKPOINT_FILES_BUCKET, description="trainbus checkpoint folders, one tar per checkpoint",
        max_bytes=max_bytes, storage=api.StorageType.FILE, replicas=auto_replicas(js._nc, replicas),
    )  # fmt: skip
    try:
        return await js.create_object_store(CHECKPOINT_FILES_BUCKET, config=config)
    except nats.js.errors.APIError as exc:
        raise BusUnavailable(
            f"JetStream refused to create {CHECKPOINT_FILES_BUCKET} ({max_bytes:,} bytes): {exc.description}; "
            "stream.objects_max_bytes sets its size (the server's max_file_bytes must hold it beside the stream)"
        ) from None
    except (TimeoutError, nats.errors.TimeoutError):  # the server drops a create this user may not send
        raise BusUnavailable(
            f"{CHECKPOINT_FILES_BUCKET} does not exist and JetStream did not answer creating it: this user may not "
            f"create it; {PROVISION}"
        ) from None


async def existing_store(js: JetStreamContext) -> ObjectStore:
    """The bucket, to fetch from (never created: an empty one would hold nothing to fetch)."""
    try:
        return await js.object_store(CHECKPOINT_FILES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        raise NotFound(f"the bus holds no checkpoint files: it has no {CHECKPOINT_FILES_BUCKET} bucket") from None


async def stored(obs: ObjectStore, run_id: str, step: int) -> Stored | None:
    """What the bucket holds for the checkpoint, or None."""
    name = object_name(run_id, step)
    try:
        info = await obs.get_info(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError, nats.js.errors.NotFoundError):
        return None
    headers = info.headers or {}
    return Stored(name, str(headers.get(SHA_HEADER, "")), int(info.size or 0))


async def upload(obs: ObjectStore, folder: Path, run_id: str, step: int, sha256: str) -> Stored:
    """Put ``folder`` in the bucket as the checkpoint ``sha256`` announced (once; never replaced)."""
    have = await stored(obs, run_id, step)
    if have is not None:
        if have.sha256 == sha256:
            return have
        raise ConfigError(
            f"{object_name(run_id, step)} is stored with sha256 {have.sha256[:12]}…; a checkpoint is never "
            f"replaced, so {folder} (sha256 {sha256[:12]}…) is not uploaded"
        )
    with tempfile.TemporaryFile() as packed:
        with tarfile.open(fileobj=packed, mode="w") as tar:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                tar.add(path, arcname=path.relative_to(folder).as_posix())
        packed.seek(0)
        meta = api.ObjectMeta(name=object_name(run_id, step), headers={SHA_HEADER: sha256})
        info = await obs.put(object_name(run_id, step), packed, meta=meta)
    return Stored(info.name or object_name(run_id, step), sha256, int(info.size or 0))


async def fetch(obs: ObjectStore, run_id: str, step: int, sha256: str, dest: Path) -> Path:
    """The checkpoint unpacked at ``dest`` once its files hash to ``sha256``; raises ``NotFound``
    when the bucket does not hold it, ``ConfigError`` when its files are not what was announced."""
    have = await stored(obs, run_id, step)
    if have is None:
        raise NotFound(
            f"{object_name(run_id, step)} is not in {CHECKPOINT_FILES_BUCKET}: its trainer did not upload it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with tempfile.TemporaryFile() as packed:
            await obs.get(have.name, writeinto=packed)
            packed.seek(0)
            with tarfile.open(fileobj=packed, mode="r") as tar:
                tar.extractall(work, filter="data")
        digest, _ = fingerprint(work)
        if digest != sha256:
            raise ConfigError(
                f"{have.name} in {CHECKPOINT_FILES_BUCKET} hashes to sha256 {digest[:12]}…, but its checkpoint "
                f"event announced {sha256[:12]}…: refused"
            )
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
        return dest
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(work)


BUS_ERRORS = (nats.errors.Error, TimeoutError)
"""What an upload or fetch may meet on the way: the caller says so and the checkpoint stays where it is."""
