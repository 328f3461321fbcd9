"""A local JetStream cluster on loopback (``trainbus up --cluster 3``), to try and to test failover.

Each node is an ordinary embedded nats-server (``runtime.bus.server``) with its own store under
``<state_dir>/cluster/n<i>``, a ``server_name`` and a ``cluster`` block whose routes name the
other nodes. The client and route ports are chosen once and kept in ``cluster.json`` beside the
stores, so a restarted node (or a restarted ``up``) listens where clients and the other nodes
expect it. ``LocalCluster.revive`` restarts a node that died (a SIGKILLed stream leader): it
rejoins with its store and catches up from the others.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from runtime.bus.server import RunningServer, find_binary, included_config, launch, lock_store
from runtime.errors import BusUnavailable, ConfigError
from runtime.settings import ServerSettings

CLUSTER_NAME = "trainbus"
PORTS_FILE = "cluster.json"


@dataclass
class Node:
    """One node: its name, store and ports, and the process while it runs."""

    name: str
    store_dir: Path
    client_port: int
    route_port: int
    server: RunningServer | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None


@dataclass
class LocalCluster:
    """The nodes of a local cluster this process started."""

    nodes: list[Node]
    settings: ServerSettings
    extra: str
    binary: str
    moved: bool = False
    """True when the remembered ports were taken and the cluster listens on new ones."""
    _locks: list[object] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what ``NATS_URL`` should say)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [node.server.pid for node in self.nodes if node.server is not None]

    def describe(self) -> list[dict[str, object]]:
        """Name, URL and pid of each node (recorded in ``bus.json`` for ``trainbus status``)."""
        return [
            {"name": n.name, "url": n.url, "pid": n.server.pid if n.server else None, "store": str(n.store_dir)}
            for n in self.nodes
        ]

    def revive(self, timeout: float = 15.0) -> list[str]:
        """Restart every node whose process exited; returns their names."""
        revived = []
        for node in self.nodes:
            if node.server is not None and node.server.process.poll() is not None:
                self._launch(node, timeout)
                revived.append(node.name)
        return revived

    def stop(self) -> None:
        for node in self.nodes:
            if node.server is not None:
                node.server.stop()
        for lock in self._locks:
            lock.close()  # type: ignore[attr-defined]
        self._locks.clear()

    def _launch(self, node: Node, timeout: float) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes if n is not node)
        block = (
            f"server_name: {node.name}\n"
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{node.route_port}\n  routes: [{routes}]\n}}\n"
        )
        node.server = launch(self.binary, self.settings, node.store_dir, block + self.extra, node.client_port, timeout)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _remembered(base: Path, size: int) -> tuple[list[int], list[int]] | None:
    try:
        data = json.loads((base / PORTS_FILE).read_text())
        client, route = [int(p) for p in data["client"]], [int(p) for p in data["route"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (client, route) if len(client) == len(route) == size else None


def start_cluster(settings: ServerSettings, base: Path, size: int, *, timeout: float = 15.0) -> LocalCluster:
    """Start ``size`` nodes under ``base`` on loopback; they elect a JetStream leader by themselves.

    ``server.port`` (when not -1) is the first node's client port, the next nodes take the
    following ones; otherwise the ports remembered in ``cluster.json`` (chosen once).
    """
    if size < 3:
        raise ConfigError(f"--cluster {size}: a JetStream cluster needs at least 3 nodes to survive losing one")
    if settings.host not in ("127.0.0.1", "localhost"):
        raise ConfigError(f"server.host: {settings.host}: `up --cluster` runs on loopback; see configs/nats/cluster/")
    base.mkdir(parents=True, exist_ok=True)
    binary = find_binary(settings.binary)
    extra = included_config(settings)
    locks = [lock_store(base / f"n{i + 1}") for i in range(size)]
    try:
        cluster = _launch_nodes(settings, base, size, binary, extra, timeout)
    except BaseException:
        for lock in locks:
            lock.close()
        raise
    cluster._locks = list(locks)
    tmp = base / (PORTS_FILE + ".tmp")
    tmp.write_text(
        json.dumps({"client": [n.client_port for n in cluster.nodes], "route": [n.route_port for n in cluster.nodes]})
    )
    tmp.replace(base / PORTS_FILE)
    return cluster


def _launch_nodes(settings: ServerSettings, base: Path, size: int, binary: str, extra: str, timeout: float) -> LocalCluster:  # fmt: skip
    """The nodes on the remembered ports; on fresh ones when one of those is taken (the cluster then moved)."""
    remembered = _remembered(base, size)
    choices = [remembered] if remembered is not None else []
    for ports in [*choices, (free_ports(size), free_ports(size))]:
        client, route = ports
        if settings.port != -1:
            client = [settings.port + i for i in range(size)]
        nodes = [Node(f"n{i + 1}", base / f"n{i + 1}", client[i], route[i]) for i in range(size)]
        fresh = ports is not remembered
        cluster = LocalCluster(nodes, settings, extra, binary, moved=fresh and remembered is not None)
        try:
            for node in nodes:
                cluster._launch(node, timeout)
        except BusUnavailable as exc:
            cluster.stop()
            if fresh or "address already in use" not in str(exc):
                raise
            continue
        return cluster
    raise AssertionError("unreachable: the fresh ports either start or raise")
