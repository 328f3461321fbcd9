"""`trainbus bench dashboard` (placeholder while the benchmark is written)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="dashboard latency, replay, memory and CPU in a real headless browser")
    p.set_defaults(func=lambda args: 0)
