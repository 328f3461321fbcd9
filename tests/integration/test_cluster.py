"""A three-node JetStream cluster: the shipped configs/nats/cluster/ files (hosts and ports replaced as a
deployer would, on loopback) form one with the trainbus roles; the stream and bucket get 3 replicas
there unless `stream.replicas` says otherwise; `trainbus status` shows servers, replicas and leader."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.bus.cluster import free_ports
from runtime.bus.connect import BusTarget, Credentials, connect
from runtime.bus.server import find_binary
from runtime.bus.stream import ensure_bucket, ensure_stream
from runtime.errors import BusUnavailable, ConfigError
from runtime.settings import BusSettings, ServerSettings, Settings, StreamSettings
from schemas import EVENTS_STREAM
from tests.conftest import ROLE_NAMES

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "nats" / "cluster"


@pytest.fixture
def passwords() -> dict[str, str]:
    return {name: "pw-" + secrets.token_hex(8) for name in ROLE_NAMES}


@pytest.fixture
def shipped_cluster(tmp_path: Path, passwords: dict[str, str]) -> Iterator[list[str]]:
    """configs/nats/cluster/nats-{1,2,3}.conf on loopback: the files' own text, with hosts, ports and the
    store folder replaced; the client URLs."""
    client, route = free_ports(3), free_ports(3)
    (tmp_path / "roles.conf").write_text((REPO / "configs/nats/roles.conf").read_text())
    env = {**os.environ, **{f"TRAINBUS_{n.upper()}_PASSWORD": p for n, p in passwords.items()}}
    procs = []
    for i in range(3):
        node = tmp_path / f"nats-{i + 1}"
        node.mkdir()
        shared = (SHIPPED / "cluster.conf").read_text()
        shared = shared.replace("port: 4222", f"port: {client[i]}").replace("http_port: 8222", "http_port: 0")
        shared = shared.replace("port: 6222", f"port: {route[i]}").replace("/var/lib/nats/jetstream", str(node / "js"))
        for j in range(3):
            shared = shared.replace(f"nats-{j + 1}:6222", f"127.0.0.1:{route[j]}")
        (node / "cluster.conf").write_text(shared)
        conf = node / f"nats-{i + 1}.conf"
        conf.write_text((SHIPPED / f"nats-{i + 1}.conf").read_text())
        check = subprocess.run(
            [find_binary(), "-t", "-c", str(conf)], env=env, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stderr
        log = (node / "log").open("w")
        procs.append(
            subprocess.Popen([find_binary(), "-c", str(conf), "-a", "127.0.0.1"], env=env, stdout=log, stderr=log)
        )
    try:
        yield [f"nats://127.0.0.1:{p}" for p in client]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def connect_when_ready(urls: list[str], creds: Credentials) -> tuple[NATS, JetStreamContext]:
    """A connection once the cluster has elected its JetStream leader (requests time out before)."""
    settings = Settings(bus=BusSettings(url=",".join(urls), connect_timeout=20))
    nc = await connect(BusTarget(urls, "test"), settings, name="test", credentials=creds)
    js = nc.jetstream(timeout=2)
    deadline = time.monotonic() + 60
    while True:
        try:
            await js.account_info()
            return nc, js
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            assert time.monotonic() < deadline, "the cluster elected no JetStream leader"
            await asyncio.sleep(0.2)


async def test_the_shipped_cluster_configs_give_r3_streams_and_status_shows_them(
    shipped_cluster: list[str], passwords: dict[str, str], tmp_path: Path
) -> None:
    admin = Credentials(user="admin", password=passwords["admin"])
    nc, js = await connect_when_ready(shipped_cluster, admin)
    # a trainer whose settings pin one replica gets one; unset, replicas follow the cluster: 3
    deadline = time.monotonic() + 30
    while True:
        try:
            assert await ensure_stream(js, StreamSettings(replicas=1)) == "created"
            break
        except BusUnavailable:  # insufficient resources: a node has not joined the meta group yet
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
    assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 1
    assert await ensure_stream(js, StreamSettings()) == "updated"
    assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 3
    assert await ensure_stream(js, StreamSettings(replicas=1)) == "updated"  # an explicit setting wins, down too
    assert await ensure_stream(js, StreamSettings()) == "updated"
    await ensure_bucket(js, "TRAINBUS_CHECKPOINTS", 3, history=5, description="test")
    await nc.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env.update(NATS_URL=",".join(shipped_cluster), NATS_USER="viewer", NATS_PASSWORD=passwords["viewer"])
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "status", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["connected"]["cluster"] == "trainbus"
    assert sorted(s["url"] for s in status["servers"]) == sorted(shipped_cluster)
    streams = {s["name"]: s for s in status["streams"]}
    for name in (EVENTS_STREAM, "KV_TRAINBUS_CHECKPOINTS"):
        assert streams[name]["replicas"] == 3
        names = {streams[name]["leader"], *(p["name"] for p in streams[name]["followers"])}
        assert names == {"nats-1", "nats-2", "nats-3"}
    text = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "status"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    assert f"stream     {EVENTS_STREAM}: 3 replicas, leader {streams[EVENTS_STREAM]['leader']};" in text


def test_a_cluster_of_fewer_than_three_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from runtime.bus.cluster import start_cluster

    with pytest.raises(ConfigError) as info:
        start_cluster(ServerSettings(), tmp_path / "cluster", 2)
    assert str(info.value) == "--cluster 2: a JetStream cluster needs at least 3 nodes to survive losing one"
    assert not (tmp_path / "cluster").exists()
