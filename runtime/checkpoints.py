"""Checkpoint fingerprints: a sha256 over a checkpoint folder, so a consumer can verify what it promotes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def fingerprint(folder: Path) -> tuple[str, int]:
    """(sha256 hex, total bytes) over every file's relative path and contents, in sorted order."""
    digest = hashlib.sha256()
    size = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def checkpoint_folders(run_dir: Path) -> dict[int, Path]:
    """The ``checkpoint-<step>`` folders of ``run_dir`` by step, in step order."""
    found = {}
    for path in run_dir.glob("checkpoint-*"):
        step = path.name.partition("-")[2]
        if step.isdigit() and path.is_dir():
            found[int(step)] = path
    return dict(sorted(found.items()))


def changed_since_announced(folder: Path, sha256: str, event_id: str) -> str | None:
    """One line naming the folder and its ``checkpoint`` event when the files no longer hash to the
    sha256 the event announced (serving, export and resume refuse such files); None when they do."""
    digest, _ = fingerprint(folder)
    if digest == sha256:
        return None
    return (
        f"{folder}: its files hash to sha256 {digest[:12]}…, but its checkpoint event {event_id} announced "
        f"{sha256[:12]}…: the files changed after the trainer saved them"
    )
