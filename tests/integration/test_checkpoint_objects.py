"""Checkpoint folders over the bus: put once, fetched anywhere only when they hash to what their
`checkpoint` event announced, and never replaced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from runtime.bus.objects import checkpoint_store, fetch, object_name, stored, upload
from runtime.checkpoints import fingerprint
from runtime.errors import ConfigError, NotFound
from runtime.publish.upload import argv
from runtime.settings import Settings


def checkpoint(folder: Path, weights: bytes = b"\x01\x02" * 5000) -> tuple[Path, str]:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (folder / "trainer_state.json").write_text('{"global_step": 20}')
    return folder, fingerprint(folder)[0]


async def test_a_checkpoint_put_on_the_bus_comes_back_whole_on_another_machine(nc: NATS, settings: Settings, tmp_path: Path) -> None:  # fmt: skip
    obs = await checkpoint_store(nc.jetstream(), settings.stream.objects_max_bytes)
    folder, sha = checkpoint(tmp_path / "trainer" / "checkpoint-20")
    first = await upload(obs, folder, "objects-a", 20, sha)
    assert (first.name, first.sha256) == (object_name("objects-a", 20), sha)
    assert await upload(obs, folder, "objects-a", 20, sha) == first  # the same checkpoint twice: stored once
    there = await fetch(obs, "objects-a", 20, sha, tmp_path / "elsewhere" / "checkpoint-20")
    assert fingerprint(there)[0] == sha
    assert (there / "trainer_state.json").read_text() == '{"global_step": 20}'
    assert not [p for p in there.parent.iterdir() if p.name.startswith(".")]  # no half-unpacked folder left


async def test_files_that_are_not_what_was_announced_are_refused_and_never_replace_the_stored_ones(nc: NATS, settings: Settings, tmp_path: Path) -> None:  # fmt: skip
    obs = await checkpoint_store(nc.jetstream(), settings.stream.objects_max_bytes)
    folder, sha = checkpoint(tmp_path / "a" / "checkpoint-30")
    await upload(obs, folder, "objects-b", 30, sha)
    changed, other = checkpoint(tmp_path / "b" / "checkpoint-30", weights=b"\x09" * 100)
    with pytest.raises(ConfigError, match="never replaced"):
        await upload(obs, changed, "objects-b", 30, other)
    assert (await stored(obs, "objects-b", 30)).sha256 == sha  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=f"announced {other[:12]}"):
        await fetch(obs, "objects-b", 30, other, tmp_path / "c" / "checkpoint-30")
    assert not (tmp_path / "c" / "checkpoint-30").exists()
    with pytest.raises(NotFound, match="did not upload it"):
        await fetch(obs, "objects-b", 40, sha, tmp_path / "d" / "checkpoint-40")


def test_the_upload_process_puts_the_checkpoint_and_says_so(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, sha = checkpoint(tmp_path / "checkpoint-5")
    env = {"NATS_URL": nats_server.url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*argv("objects-c", 5, sha, folder)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert '"checkpoint uploaded to the bus"' in done.stderr and str(folder) in done.stderr
    nobus = subprocess.run([sys.executable, "-m", "runtime.publish.upload", "objects-c", "6", sha, str(folder)],
                           env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert nobus.returncode == 1 and "stays on this machine" in nobus.stderr
    assert not (tmp_path / ".trainbus" / "nats").exists()  # it never starts a bus of its own
