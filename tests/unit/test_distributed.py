"""Commands reach every rank even when the default process group serves only CUDA tensors (NCCL).

A CPU machine stands in for a multi-GPU one: ``backend="cuda:gloo"`` registers gloo for CUDA
tensors only, so, like NCCL, the default group refuses a CPU tensor ("No backend type associated
with device type cpu").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from producers.run.distributed import release_command_group, share_commands
from schemas import Pause, SetHyperparameters


def _rank(rank: int, store: str, out: str, backend: str) -> None:
    dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = (
            [
                Pause(command_id="c1", run_id="r", issued_by="t"),
                SetHyperparameters(command_id="c2", run_id="r", issued_by="t", learning_rate=1e-4),
            ]
            if rank == 0
            else []
        )
        got = [share_commands(mine if step == 3 else []) for step in range(5)]  # four quiet steps, one with commands
        Path(out, f"rank{rank}.json").write_text(json.dumps([[c.command_id for c in step] for step in got]))
        release_command_group()  # as the callback does when the run ends: no gloo group left at exit
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, backend: str) -> list[list[list[str]]]:
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path), backend), nprocs=2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_commands_reach_every_rank_when_the_default_group_has_no_cpu_backend(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "cuda:gloo")
    assert ranks[0] == ranks[1] == [[], [], [], ["c1", "c2"], []]


def test_a_gloo_default_group_still_shares_commands(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "gloo")
    assert ranks[0] == ranks[1] == [[], [], [], ["c1", "c2"], []]
