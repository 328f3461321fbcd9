"""An agent's slots, and whether it takes a job: pure, so the rules are tested without a bus.

An agent has N slots — N GPUs with ``--gpus``, else N CPU slots. A job asks for some; the agent
takes it when they are free now (``take``), holds the line when they will be free once a running
job ends (``wait``: the job goes back to the head of the queue and the agent takes nothing of
lower priority meanwhile), and leaves it to others when it could never run it (``leave``: more
slots than it has, or labels it lacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas.jobs import JobSpec

Decision = Literal["take", "wait", "leave"]


@dataclass
class Slots:
    """What an agent has and what its running jobs hold."""

    total: int
    gpus: list[int] = field(default_factory=list)
    """GPU ids, one per slot; empty for CPU slots."""
    labels: dict[str, str] = field(default_factory=dict)
    held: dict[str, list[int]] = field(default_factory=dict)
    """Job id → the slot indices it holds."""

    @classmethod
    def of(cls, slots: int | None, gpus: list[int] | None, labels: dict[str, str] | None = None) -> Slots:
        """``--gpus`` sets both the slots and their GPUs; else ``--slots`` (default 1) CPU slots."""
        return cls(total=len(gpus) if gpus else (slots or 1), gpus=list(gpus or []), labels=dict(labels or {}))

    @property
    def free(self) -> int:
        return self.total - sum(len(held) for held in self.held.values())

    def decide(self, spec: JobSpec) -> Decision:
        """Whether to start ``spec`` now, hold the line for it, or leave it to another agent."""
        if spec.slots > self.total or any(self.labels.get(k) != v for k, v in spec.requires.items()):
            return "leave"
        return "take" if spec.slots <= self.free else "wait"

    def hold(self, job_id: str, n: int) -> list[int]:
        """Give ``job_id`` ``n`` free slots; returns their GPU ids (empty on CPU slots)."""
        busy = {i for held in self.held.values() for i in held}
        chosen = [i for i in range(self.total) if i not in busy][:n]
        if len(chosen) < n:
            raise ValueError(f"{n} slots asked for, {len(chosen)} free")
        self.held[job_id] = chosen
        return [self.gpus[i] for i in chosen] if self.gpus else []

    def release(self, job_id: str) -> None:
        self.held.pop(job_id, None)


def cuda_devices(gpus: list[int]) -> dict[str, str]:
    """The environment that shows a job only its own GPUs (nothing to set on CPU slots)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)} if gpus else {}
