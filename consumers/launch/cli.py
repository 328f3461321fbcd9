"""`trainbus agent`: run queued jobs on this machine's slots; `trainbus agent --drain`: ask a running
agent to stop taking them.

    trainbus agent --slots 2                     # two CPU slots (torch threads shared between them)
    trainbus agent --gpus 0,1 --label gpu=a100   # one slot per GPU; jobs see only their own
    trainbus agent --drain --agent host-1 [--requeue]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import nats.errors

from consumers.launch.agent import Agent, Options
from consumers.launch.slots import Slots
from runtime.bus.connect import BusTarget, bus_target, connected
from runtime.cli.args import add_settings_args, key_values, settings_from
from runtime.errors import ConfigError, NotFound
from runtime.launch.queue import ensure_queue
from runtime.settings import Settings
from schemas.jobs import AGENT_ID_PATTERN
from schemas.subjects import agent_subject


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run queued jobs on this machine's free slots (trainbus submit queues them)")
    slots = p.add_mutually_exclusive_group()
    slots.add_argument("--slots", type=int, metavar="N", help="CPU slots: jobs it runs at once (default 1)")
    slots.add_argument(
        "--gpus", metavar="0,1,…", help="one slot per GPU; a job sees only its own (CUDA_VISIBLE_DEVICES)"
    )
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="describe this machine; a job submitted with --on KEY=VALUE runs only here")  # fmt: skip
    p.add_argument("--agent", metavar="ID", help="this agent's id (default <host>-<pid>); with --drain: whom to drain")
    p.add_argument(
        "--drain", action="store_true", help="ask a running agent to take no more jobs and exit when they end"
    )
    p.add_argument("--requeue", action="store_true", help="with --drain: checkpoint its jobs and hand them back now")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where job configs and logs go (default <state_dir>/agents/ID)"
    )
    add_settings_args(p)
    p.set_defaults(func=cmd_agent)


def options_of(args: argparse.Namespace, settings: Settings, target: BusTarget) -> Options:
    """The agent's options from its arguments; a mistake names the flag."""
    agent_id = args.agent or f"{socket.gethostname()}-{os.getpid()}"
    if not _valid_id(agent_id):
        raise ConfigError(f"--agent {agent_id!r}: use 1-64 characters of A-Z a-z 0-9 _ -")
    if args.slots is not None and args.slots < 1:
        raise ConfigError(f"--slots {args.slots}: at least 1")
    slots = Slots.of(args.slots, _gpus(args.gpus), key_values(args.label, "--label", "gpu=a100"))
    workdir = args.workdir or Path(settings.state_dir) / "agents" / agent_id
    return Options(agent_id=agent_id, slots=slots, workdir=workdir.resolve(), servers=",".join(target.servers))


def cmd_agent(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.requeue and not args.drain:
        raise ConfigError("--requeue goes with --drain (a running agent hands its jobs back)")
    with bus_target(settings) as target:
        if args.drain:
            return asyncio.run(_drain(target, settings, args))
        options = options_of(args, settings, target)
        asyncio.run(_serve(target, settings, options))
    return 0


async def _serve(target: BusTarget, settings: Settings, options: Options) -> None:
    async with connected(target, settings, name=f"trainbus-agent-{options.agent_id}") as nc:
        await ensure_queue(nc.jetstream(), settings.stream)
        agent = await Agent.open(nc, options)
        print(f"agent {options.agent_id}: {options.slots.total} slot(s); waiting for jobs", flush=True)
        await agent.run()


async def _drain(target: BusTarget, settings: Settings, args: argparse.Namespace) -> int:
    if not args.agent:
        raise ConfigError("--drain needs --agent ID (`trainbus queue` lists the agents)")
    async with connected(target, settings, name="trainbus-agent-drain") as nc:
        try:
            reply = await nc.request(agent_subject(args.agent), b"requeue" if args.requeue else b"drain", timeout=5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
            raise NotFound(f"no agent {args.agent!r} answered (`trainbus queue` lists the live ones)") from None
    print(reply.data.decode())
    return 0


def _valid_id(agent_id: str) -> bool:
    return re.match(AGENT_ID_PATTERN, agent_id) is not None


def _gpus(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        gpus = [int(g) for g in value.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {value!r}: a comma-separated list of GPU ids, e.g. 0,1") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ConfigError(f"--gpus {value!r}: distinct GPU ids, e.g. 0,1")
    return gpus


def service() -> list[str]:
    """`trainbus up` runs one local agent of one slot (``trainbus.services``)."""
    return [sys.executable, "-m", "runtime.cli", "agent", "--slots", "1"]
