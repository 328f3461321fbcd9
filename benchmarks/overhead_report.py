"""The figures of `trainbus bench overhead` (``benchmarks.overhead``): one ``Phase`` per placement of the
processes, its statistics and the side-by-side table with the verdicts on the targets."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("plain", "trainbus")  # A, B
LABELS = {"plain": "A plain Trainer", "trainbus": "B trainbus + consumer"}
RATIO_TARGET = 0.99
CPU_TARGET = 0.01
FAST_RATIO_TARGET = 0.97
FAST_CPU_TARGET = 0.02
RSS_TARGET_MB = 50.0
BOOTSTRAP = 2000


@dataclass
class Phase:
    """One phase: where its processes run, and per variant the wall and CPU seconds of each step, block by block."""

    name: str
    trainer_cpus: list[int] | None
    bus_cpus: list[int] | None
    wall: dict[str, list[list[float]]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    cpu: dict[str, list[list[float]]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    about: dict[str, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    bus_cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds each bus process used while the variants took turns."""
    publisher_rss_mb: float | None = None
    """B's publisher process, when it has one: its RSS after the turns (outside the training process)."""

    def pairs(self, kind: str) -> list[tuple[float, float]]:
        """(A, B) seconds per timed block, ``wall`` or ``cpu``; the first block is the warm-up."""
        table = self.wall if kind == "wall" else self.cpu
        return [(sum(a), sum(b)) for a, b in zip(table["plain"][1:], table["trainbus"][1:], strict=True)]

    def step_pairs(self) -> list[tuple[float, float]]:
        """(A, B) wall seconds of each timed step."""
        blocks = zip(self.wall["plain"][1:], self.wall["trainbus"][1:], strict=True)
        return [p for a, b in blocks for p in zip(a, b, strict=True)]


def _interval(values: list[Any], statistic: Any) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``statistic`` over ``values`` (seeded: the same run, the same figures)."""
    rng = random.Random(0)
    boot = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP))
    return boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]


def _total_ratio(pairs: list[tuple[float, float]]) -> float:
    """B/A steps/s over ``pairs`` of (A seconds, B seconds) for the same steps."""
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs)


def _extra_cpu(pairs: list[tuple[float, float]]) -> float:
    """B's CPU per step over A's, minus 1, over ``pairs`` of (A CPU seconds, B CPU seconds)."""
    return sum(b for _, b in pairs) / sum(a for a, _ in pairs) - 1


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


TITLES = {"own": "(a) own cores", "shared": "(b) shared cores", "fast": "(c) fast steps, shared cores"}
TARGETS = {"own": (RATIO_TARGET, CPU_TARGET), "fast": (FAST_RATIO_TARGET, FAST_CPU_TARGET)}
"""Phases with targets: steps/s B/A at least, extra CPU per step at most."""


def _row(label: str, cells: list[str]) -> None:
    print(f"{label:<38}" + "".join(f"{c:<38}" for c in cells))


def summary(phases: list[Phase]) -> None:
    """Both phases side by side, then the verdicts on (a)."""
    _row("", [TITLES[p.name] for p in phases])
    _row("trainer cores / torch threads", [_where(p) for p in phases])
    for variant in VARIANTS:
        cells = []
        for p in phases:
            wall = sum(sum(block) for block in p.wall[variant][1:])
            seconds = sum(sum(block) for block in p.cpu[variant][1:])
            steps = sum(len(block) for block in p.wall[variant][1:])
            cells.append(f"{steps / wall:6.2f} steps/s  CPU {seconds / steps * 1000:6.1f} ms/step")
        _row(LABELS[variant], cells)
    ratio = [(_total_ratio(p.pairs("wall")), _interval(p.pairs("wall"), _total_ratio)) for p in phases]
    _row("steps/s B/A (95% interval)", [f"{r:6.3f}  ({lo:.3f}-{hi:.3f})" for r, (lo, hi) in ratio])
    median = [(_median_ratio(p.step_pairs()), _interval(p.step_pairs(), _median_ratio)) for p in phases]
    _row("  median step pair", [f"{r:6.3f}  ({lo:.3f}-{hi:.3f})" for r, (lo, hi) in median])
    cpu = [(_extra_cpu(p.pairs("cpu")), _interval(p.pairs("cpu"), _extra_cpu)) for p in phases]
    _row("CPU per step B-A (95% interval)", [f"{c:+6.2%}  ({lo:+.2%} to {hi:+.2%})" for c, (lo, hi) in cpu])
    rss = [p.final["trainbus"]["peak_rss_mb"] - p.final["plain"]["peak_rss_mb"] for p in phases]
    _row("peak RSS B-A", [f"{r:+6.1f} MB" for r in rss])
    _row(
        "B's publisher process RSS", [f"{p.publisher_rss_mb:6.1f} MB" if p.publisher_rss_mb else "none" for p in phases]
    )
    _row("B: Python threads / switch interval", [_threads(p) for p in phases])
    _row("B events: published / read / outbox", [_events(p) for p in phases])
    _row("B: trainbus's own CPU per step", [_own(p) for p in phases])
    _row("bus CPU per B step", [_bus(p) for p in phases])
    for v in VARIANTS:
        _row(f"{LABELS[v][0]}: GC runs gen 0/1/2, seconds", [_gc(p.final[v]) for p in phases])
    for p, r, c, extra in zip(phases, ratio, cpu, rss, strict=True):
        if p.name in TARGETS:
            _verdicts(p, r, c, extra)


def _verdicts(
    p: Phase, ratio: tuple[float, tuple[float, float]], cpu: tuple[float, tuple[float, float]], rss: float
) -> None:
    """The phase's figures against its targets (``TARGETS``)."""
    (r, (lo, hi)), (c, (clo, chi)) = ratio, cpu
    want_ratio, want_cpu = TARGETS[p.name]
    tag = TITLES[p.name].split()[0]
    if p.name == "own" and p.trainer_cpus is None:
        print("(a) could not move the bus off the trainer's cores: this machine has one core")
    print(f"{tag} target steps/s B/A >= {want_ratio}: {_verdict(r >= want_ratio, lo < want_ratio <= hi)}")
    print(f"{tag} target CPU per step <= +{want_cpu:.0%}: {_verdict(c <= want_cpu, clo <= want_cpu < chi)}")
    if p.name == "own":
        print(f"(a) target peak RSS <= +{RSS_TARGET_MB:.0f} MB: {'met' if rss <= RSS_TARGET_MB else 'NOT met'}")


def _verdict(met: bool, straddles: bool) -> str:
    return ("met" if met else "NOT met") + (
        "; the interval straddles the target: more --steps narrow it" if straddles else ""
    )


def _where(p: Phase) -> str:
    about = p.about["trainbus"]
    bus = f"; bus on {','.join(map(str, p.bus_cpus))}" if p.bus_cpus else "; bus anywhere"
    return f"{','.join(map(str, about['cpus']))} / {about['torch_threads']}{bus}"


def _threads(p: Phase) -> str:
    about = {v: p.about[v] for v in VARIANTS}
    return f"{about['trainbus']['threads']} (A {about['plain']['threads']}) / {about['trainbus']['switch_interval_ms']:g} ms"


def _events(p: Phase) -> str:
    b = p.final["trainbus"]
    return f"{b['published']} / {b['consumed']} / {b['outbox_pending']}"


def _own(p: Phase) -> str:
    """Trainbus's CPU inside the training process per step, counted directly, and as a share of A's CPU per step."""
    b, own = p.final["trainbus"], p.final["trainbus"].get("own_cpu")
    if not own:
        return "not measured"
    per_step = (own["hooks_s"] + own["threads_s"]) / max(1, b["steps"])
    a_cpu = sum(sum(block) for block in p.cpu["plain"][1:]) / max(1, sum(len(block) for block in p.cpu["plain"][1:]))
    return f"{per_step * 1000:.2f} ms ({per_step / a_cpu:+.2%}; threads {own['threads_s'] * 1000 / max(1, b['steps']):.2f} ms)"


def _gc(final: dict[str, Any]) -> str:
    gc = final.get("gc") or {"count": [0, 0, 0], "seconds": [0.0]}
    return f"{'/'.join(str(int(c)) for c in gc['count'])}, {sum(gc['seconds']):.2f} s"


def _bus(p: Phase) -> str:
    steps = sum(len(block) for block in p.wall["trainbus"][1:]) + len(p.wall["trainbus"][0])
    return ", ".join(f"{name} {seconds / steps * 1000:.2f} ms" for name, seconds in p.bus_cpu.items())
