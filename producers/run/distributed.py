"""Multi-process runs: rank 0 owns the bus; commands it receives are shared at each step boundary.

The per-step cost is one broadcast of a single int (how many commands, usually 0); only when
that is non-zero does the command list itself travel, so every rank applies the same commands at
the same step. Commands travel on a group that serves CPU tensors: on GPUs the default group is
NCCL, which serves only CUDA tensors, so a gloo side group is created once for them (which also
keeps the per-step check from forcing a CUDA synchronisation); it is released when the run ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from runtime.logs import get_logger
from schemas import COMMAND_ADAPTER, Command


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torch.distributed or the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_if_launched() -> None:
    """Join the process group when started by torchrun/accelerate (before any rank-dependent work)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()


def agree(value: str | None) -> str | None:
    """Rank 0's ``value`` on every rank (e.g. a generated run id)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box: list[object] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0] if isinstance(box[0], str) else None


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes files); the other ranks then run it too."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    yield
    if distributed and dist.get_rank() == 0:
        dist.barrier()


_side: dict[str, Any] = {}  # the default group the side group was made for, and the side group


def serves_cpu(backend: str) -> bool:
    """Whether a process group with ``backend`` (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``…) takes CPU tensors."""
    return backend in ("gloo", "mpi") or any(part.strip().startswith("cpu:") for part in backend.split(","))


def command_group() -> Any:
    """A process group that serves CPU tensors: the default one if it does, else a gloo group made once.

    Every rank calls this at the same step boundary (``new_group`` is collective), and the same
    group is returned until the default group is replaced.
    """
    default = dist.group.WORLD
    if _side.get("for") is not default:
        _side["for"] = default
        _side["group"] = None if serves_cpu(str(dist.get_backend())) else dist.new_group(backend="gloo")
    return _side["group"]


def release_command_group(wait: float = 60.0) -> None:
    """Destroy the side group (every rank, when its run ends), once all ranks are done with it.

    A gloo group still alive when the interpreter exits can abort the process
    ("terminate called without an active exception"), which a launcher reports as a failure.
    """
    group = _side.pop("group", None)
    _side.pop("for", None)
    if group is None or not dist.is_initialized():
        return
    try:  # gloo-only, and it gives up instead of hanging when a rank never comes
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=wait))
    except RuntimeError as exc:
        get_logger().warning("not every rank reached the end of the run", error=str(exc).splitlines()[0])
    dist.destroy_process_group(group)


def share_commands(commands: list[Command]) -> list[Command]:
    """Rank 0's ``commands`` on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return commands
    group = command_group()
    count = torch.tensor([len(commands) if dist.get_rank() == 0 else 0], dtype=torch.int64)
    dist.broadcast(count, src=0, group=group)
    if int(count.item()) == 0:
        return []
    payload: list[object] = [[c.model_dump(mode="json") for c in commands] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, group=group)
    received = payload[0]
    assert isinstance(received, list)
    return [COMMAND_ADAPTER.validate_python(item) for item in received]
