"""Multi-process runs: rank 0 owns the bus; commands it receives are shared at each step boundary.

The per-step cost is one broadcast of a single int (how many commands, usually 0); only when
that is non-zero does the command list itself travel, so every rank applies the same commands at
the same step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

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


def share_commands(commands: list[Command]) -> list[Command]:
    """Rank 0's ``commands`` on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return commands
    count = torch.tensor([len(commands) if dist.get_rank() == 0 else 0], dtype=torch.int64)
    dist.broadcast(count, src=0)
    if int(count.item()) == 0:
        return []
    payload: list[object] = [[c.model_dump(mode="json") for c in commands] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    received = payload[0]
    assert isinstance(received, list)
    return [COMMAND_ADAPTER.validate_python(item) for item in received]
