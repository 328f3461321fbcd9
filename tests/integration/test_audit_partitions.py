"""The audit gate scaled out by run (`trainbus audit --partition K/N`) against a real nats-server:
two gates split the runs, a killed one's runs wait and are judged when a replacement takes its
partition, and nothing is missed or published twice."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.audit.engine import Publish, handle, new_state
from consumers.audit.partitions import PARTITIONED_STREAM
from consumers.audit.rules import load_rules
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream, replay
from runtime.settings import BusSettings, ServerSettings, Settings
from schemas import ALL_EVENTS, AuditVerdict
from tests.integration.test_audit import REPO, AuditProcess, _publish_history, audit_events

RUNS = ("split-a", "split-b", "split-c", "split-d")
"""NATS puts split-a and split-c in partition 1 of 2, split-b and split-d in partition 0 (checked below)."""


class Gate(AuditProcess):
    def wait_ready(self, timeout: float = 30) -> str:
        line = self.lines.get(timeout=timeout)
        assert line.startswith("trainbus audit: watching partition "), line
        return line


def judged_runs(log: Path) -> set[str]:
    """Runs a gate published flags or verdicts for, from its JSON log lines."""
    runs = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") in ("flag", "verdict"):
                runs.add(entry["run_id"])
    return runs


async def count_for(js: Any, runs: tuple[str, ...]) -> int:
    return sum([len(await audit_events(js, f"trainbus.events.{run}.audit.>")) for run in runs])


async def wait_for(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_two_gates_split_the_runs_and_a_killed_gates_runs_are_judged_when_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)  # its own partition stream and durables
    gates: list[Gate] = []

    def gate(k: int, name: str) -> Gate:
        gates.append(Gate(server.url, "--partition", f"{k}/2", log=tmp_path / f"{name}.log"))
        gates[-1].wait_ready()
        return gates[-1]

    try:
        settings = Settings(state_dir=str(tmp_path / "state"), bus=BusSettings(url=server.url))
        target = BusTarget([server.url], "test")
        nc = await connect(target, settings, name="test")
        js = nc.jetstream()
        await ensure_stream(js, settings.stream)
        first = gate(0, "gate0")
        gate(1, "gate1")
        stop = threading.Event()
        thread = threading.Thread(target=_publish_history, args=(target, settings, tmp_path / "out.jsonl", stop, RUNS))
        thread.start()
        zero, one = ("split-b", "split-d"), ("split-a", "split-c")
        try:
            await wait_for(lambda: _each_at_least(js, (zero, one), 4), "both gates to judge their runs")
            first.kill()
            left = await count_for(js, zero)
            base = await count_for(js, one)
            await wait_for(lambda: _more_than(js, one, base + 6), "the other gate to carry on alone")
            assert await count_for(js, zero) == left  # nobody judges partition 0 while its gate is down
            gate(0, "replacement")  # takes partition 0 back: replays it and judges its runs again
            await wait_for(lambda: _more_than(js, zero, left + 6), "the replacement to judge partition 0")
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 30)

        info = await js.stream_info(PARTITIONED_STREAM, subjects_filter="trainbus.audit.*.*.train.step")
        partition = {s.split(".")[3]: s.split(".")[2] for s in info.state.subjects or {}}
        assert partition == {"split-a": "1", "split-b": "0", "split-c": "1", "split-d": "0"}

        monkeypatch.chdir(REPO)
        state, expected = new_state(load_rules("configs/audit.yaml")), dict[str, Any]()
        async for item in replay(js, ALL_EVENTS):  # one uninterrupted pass of the engine over everything
            if item.event is not None and item.event.source != "audit":
                state, outputs = handle(item.event, state)
                expected.update({o.event.event_id: o.event for o in outputs if isinstance(o, Publish)})
        assert len(expected) > 30
        await wait_for(lambda: _at_least(js, len(expected)), "every expected flag and verdict", timeout=60)
        await asyncio.sleep(1.0)  # nothing more may arrive
        stored = await audit_events(js, "trainbus.events.*.audit.>")
        assert sorted(e.event_id for e in stored) == sorted(expected)  # none missed, none twice
        seqs: dict[tuple[str, int], list[int]] = {}
        for event in stored:
            seqs.setdefault((event.run_id, event.attempt), []).append(event.seq)
        assert {k: sorted(v) for k, v in seqs.items()} == {k: list(range(1, len(v) + 1)) for k, v in seqs.items()}
        checkpoints = [d.event.event_id async for d in replay(js, "trainbus.events.*.checkpoint") if d.event]
        verdicts = [e.checkpoint_event_id for e in stored if isinstance(e, AuditVerdict)]
        assert sorted(verdicts) == sorted(checkpoints)  # one verdict per checkpoint

        for g in gates:
            g.kill()
        assert judged_runs(tmp_path / "gate1.log") == set(one)  # each run's events reached one gate
        assert judged_runs(tmp_path / "gate0.log") | judged_runs(tmp_path / "replacement.log") == set(zero)
        await nc.close()
    finally:
        for g in gates:
            g.kill()
        server.stop()


async def _each_at_least(js: Any, groups: tuple[tuple[str, ...], ...], n: int) -> bool:
    return all([await count_for(js, runs) >= n for runs in groups])


async def _more_than(js: Any, runs: tuple[str, ...], n: int) -> bool:
    return await count_for(js, runs) > n


async def _at_least(js: Any, n: int) -> bool:
    return len(await audit_events(js, "trainbus.events.*.audit.>")) >= n


async def test_a_gate_that_would_split_the_runs_another_way_is_refused_until_repartition(tmp_path: Path) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    gates: list[Gate] = []
    try:
        gates.append(Gate(server.url, "--partition", "0/2", log=tmp_path / "two.log"))
        gates[-1].wait_ready()
        other = Gate(server.url, "--partition", "2/3", log=tmp_path / "three.log")
        assert other.proc.wait(30) == 1
        assert (tmp_path / "three.log").read_text().strip().splitlines()[-1] == (
            "trainbus audit: TRAINBUS_AUDIT is partitioned 2 ways, not 3: use --partition K/2, or stop every "
            "partitioned gate and start one with --repartition to split the runs 3 ways"
        )
        gates[0].stop()
        gates.append(Gate(server.url, "--partition", "2/3", "--repartition", log=tmp_path / "three.log"))
        assert "partition 2 of 3" in gates[-1].wait_ready()
    finally:
        for g in gates:
            g.kill()
        server.stop()
