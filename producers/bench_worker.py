"""One variant of `trainbus bench overhead`, in a process of its own so its peak RSS is its own.

``producers.bench_overhead`` runs it; by hand (from the repository root)::

    python -m producers.bench_worker plain configs/tiny.yaml --run-id a1 --result a1.json \\
        --set training.max_steps=20 --set training.eval_steps=null --set training.save_steps=null
    NATS_URL=nats://127.0.0.1:4222 python -m producers.bench_worker trainbus configs/tiny.yaml \\
        --run-id b1 --result b1.json --set training.max_steps=20 ...

``plain`` trains with the bare ``transformers.Trainer`` that ``build_trainer(prep, [])`` returns;
``trainbus`` adds a ``TrainbusCallback`` that publishes to the bus (NATS_URL) and answers commands,
wired as ``trainbus train`` wires it. Both write one JSON object to ``--result``: the steps, the
seconds spent inside ``trainer.train()``, the process's peak RSS and the events published.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from producers.config import RunConfig
from runtime.errors import TrainbusError
from runtime.logs import get_logger, setup_logging
from runtime.settings import load_config
from runtime.sinks import EventSink, NullSink

VARIANTS = ("plain", "trainbus")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ``ru_maxrss`` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return kib * scale / 1024


def train_variant(variant: str, cfg: RunConfig, run_id: str) -> dict[str, Any]:
    """Train ``cfg`` once as ``variant``; returns the figures the benchmark prints."""
    from transformers import TrainerCallback

    from producers.callback import TrainbusCallback, open_bus
    from producers.control import ControlChannel
    from producers.train import build_trainer, prepare, run_callback

    prep = prepare(cfg, run_id=run_id)
    sink: EventSink = NullSink()
    callbacks: list[TrainerCallback] = []
    callback: TrainbusCallback | None = None
    if variant == "trainbus":
        channel = ControlChannel(prep.run_id)
        sink = open_bus(prep.run_id, cfg, prep.run_dir / "outbox.jsonl", channel, cfg.publish.memory_limit)
        callback = run_callback(prep, sink, channel)
        callbacks.append(callback)
    trainer = build_trainer(prep, callbacks)
    if callback is not None:
        callback.trainer = trainer
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    stats = sink.close(timeout=cfg.publish.close_timeout)  # after the timed loop: the run is over by then
    return {
        "variant": variant,
        "run_id": prep.run_id,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "train_runtime": float(output.metrics.get("train_runtime", seconds)),
        "peak_rss_mb": peak_rss_mb(),
        "published": stats.published,
        "outbox_pending": stats.outbox_pending,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the worker's arguments, train one variant, write its figures as JSON."""
    p = argparse.ArgumentParser(
        prog="python -m producers.bench_worker", description="one variant of trainbus bench overhead"
    )
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("config", help="run config YAML, e.g. configs/tiny.yaml")
    p.add_argument("--run-id", required=True)
    p.add_argument("--result", required=True, type=Path, help="where to write the figures (JSON)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        setup_logging(cfg.log.level, cfg.log.format)
        figures = train_variant(args.variant, cfg, args.run_id)
    except TrainbusError as exc:
        print(f"bench worker ({args.variant}): {exc}", file=sys.stderr)
        return exc.exit_code
    args.result.write_text(json.dumps(figures))
    get_logger(run_id=args.run_id).info("bench variant done", **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
