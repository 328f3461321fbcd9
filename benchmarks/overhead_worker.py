"""One variant of `trainbus bench overhead`: a training process that runs in blocks on command.

``benchmarks.overhead`` starts one worker per variant and interleaves them: at every block
boundary (before step 1, then every ``--block`` steps, the last one included) the worker reports on ``--report-fd`` and
waits for a line on ``--control-fd`` before it trains the next block. Both variants carry the same
``Pacer`` callback, so the harness costs them the same; the figures are the seconds from "go" to the
next boundary, step by step.

``plain`` trains with the bare ``transformers.Trainer`` that ``build_trainer(prep, [])`` returns;
``trainbus`` adds a ``TrainbusCallback`` that publishes to the bus (NATS_URL) and answers commands,
wired as ``trainbus train`` wires it. Report lines are JSON: ``{"steps": [seconds, ...], "cpu":
[seconds, ...]}`` after a block (wall and this process's CPU time, all its threads, per step; empty
before the first, which also says how the process runs: torch threads, the GIL switch interval, the
publisher's own process if it has one), and the final figures (steps, the process's peak RSS,
events published) once training is over. ``--bus-cpus`` moves that publisher process off this
process's cores (the coordinator pins this one with ``sched_setaffinity`` before Python starts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time
from typing import IO, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from benchmarks.overhead_report import VARIANTS
from producers.config import RunConfig
from runtime.errors import TrainbusError
from runtime.logs import setup_logging
from runtime.publish.sinks import EventSink, NullSink
from runtime.settings import load_config, packaged


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ``ru_maxrss`` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return kib * scale / 1024


class Pacer(TrainerCallback):
    """Stops at every block boundary until the coordinator says go; times each step.

    A step's time runs from the end of the one before (or from "go") to its own end, so it holds
    the logging, the data loading and every callback of the step. Added last, so that includes
    every other callback's work.
    """

    def __init__(self, block: int, control: IO[str], report: IO[str]) -> None:
        self.block = block
        self.control = control
        self.report = report
        self.times: list[float] = []
        self.about: dict[str, Any] = {}
        """Said with the first report: how this process runs (see ``describe``)."""
        self._block: list[float] = []
        self._cpu: list[float] = []
        self._last = self._last_cpu = 0.0

    def _boundary(self) -> None:
        self.report.write(json.dumps({"steps": self._block, "cpu": self._cpu, **self.about}) + "\n")
        self.report.flush()
        self._block, self._cpu, self.about = [], [], {}
        if not self.control.readline():  # the coordinator went away
            raise SystemExit(3)
        self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.about:  # Python threads once every callback has started its own
            self.about["threads"] = threading.active_count()
        self._boundary()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self._block.append(now - self._last)
        self._cpu.append(cpu - self._last_cpu)
        self.times.append(now - self._last)
        self._last, self._last_cpu = now, cpu
        if state.global_step % self.block == 0:  # also after the last step: the end of the run is not timed
            self._boundary()


class GcTimer:
    """Python's cyclic garbage collections during training, per generation: how many, and their seconds.

    More Python objects per step (events being built) mean more collections; a full one walks every
    object of a process that holds torch and transformers, so this says whether that is where time goes.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start

    def stop(self) -> None:
        gc.callbacks.remove(self._on_gc)

    def figures(self) -> dict[str, list[float]]:
        return {"count": list(map(float, self.count)), "seconds": self.seconds}


class OwnCpu:
    """CPU time trainbus itself takes in this process, counted directly: its callback's per-step hooks
    on the training thread, and every other Python thread (the heartbeat).

    The A/B difference of whole-process CPU carries the noise of the training itself; this is the
    part that is trainbus's by construction (what it adds to the interpreter, e.g. GIL hand-offs, is
    not in it, and is in the A/B ratios).
    """

    def __init__(self, callback: TrainerCallback) -> None:
        self.hooks = 0.0
        once = {"on_init_end", "on_train_begin", "on_train_end"}  # not per step: run.started, run.finished
        for name in dir(TrainerCallback):
            if name.startswith("on_") and name not in once and name in type(callback).__dict__:
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return hook(*args, **kwargs)
            finally:
                self.hooks += time.thread_time() - start

        return timed

    def figures(self) -> dict[str, float]:
        import psutil

        # Python threads only: torch's OpenMP workers are OS threads of the training itself
        python = {t.native_id for t in threading.enumerate() if t is not threading.main_thread()}
        others = sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in python)
        return {"hooks_s": self.hooks, "threads_s": others}


def describe(sink: EventSink, bus_cpus: list[int] | None) -> dict[str, Any]:
    """How this process runs, for the benchmark's header: torch threads, its cores, the GIL switch
    interval, and the publisher's own process (moved to ``bus_cpus``) when the sink has one."""
    import torch

    pid = getattr(sink, "pid", None)
    if pid is not None and bus_cpus:
        os.sched_setaffinity(pid, bus_cpus)
    return {
        "torch_threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "publisher_pid": pid,
    }


def train_variant(
    variant: str, cfg: RunConfig, run_id: str, pacer: Pacer, bus_cpus: list[int] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` once as ``variant``, paced by ``pacer``; returns the figures the benchmark prints."""
    from producers.run.callback import TrainbusCallback, open_bus
    from producers.run.control_inbox import ControlChannel
    from producers.run.train import build_trainer, prepare, run_callback

    prep = prepare(cfg, run_id=run_id)
    sink: EventSink = NullSink()
    callbacks: list[TrainerCallback] = []
    callback: TrainbusCallback | None = None
    if variant == "trainbus":
        channel = ControlChannel(prep.run_id)
        sink = open_bus(prep.run_id, cfg, prep.run_dir / "outbox.jsonl", channel, window=cfg.publish.window_ms / 1000)
        callback = run_callback(prep, sink, channel)
        callbacks.append(callback)
    trainer = build_trainer(prep, [*callbacks, pacer])
    own = OwnCpu(callback) if callback is not None else None
    if callback is not None:
        callback.trainer = trainer
    pacer.about = describe(sink, bus_cpus)
    collections = GcTimer()
    trainer.train()
    collections.stop()
    own_cpu = own.figures() if own is not None else None  # before close: its thread may end there
    stats = sink.close(timeout=cfg.publish.close_timeout)  # after the timed blocks: the run is over by then
    return {
        "variant": variant,
        "run_id": prep.run_id,
        "steps": trainer.state.global_step,
        "step_seconds": pacer.times,
        "peak_rss_mb": peak_rss_mb(),
        "published": stats.published,
        "gc": collections.figures(),
        "own_cpu": own_cpu,
        "outbox_pending": stats.outbox_pending,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the worker's arguments, train one variant in blocks, report its figures as JSON."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead_worker", description="one variant of trainbus bench overhead"
    )
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("config", type=packaged, help="run config YAML, e.g. configs/tiny.yaml")
    p.add_argument("--run-id", required=True)
    p.add_argument("--block", type=int, required=True, help="steps per block")
    p.add_argument("--control-fd", type=int, required=True, help="read a line here before each block")
    p.add_argument("--report-fd", type=int, required=True, help="JSON lines go here")
    p.add_argument("--bus-cpus", help="comma-separated cores for the publisher's own process, if it has one")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    with os.fdopen(args.control_fd, "r") as control, os.fdopen(args.report_fd, "w") as report:
        try:
            cfg = load_config(RunConfig, args.config, args.overrides)
            setup_logging(cfg.log.level, cfg.log.format)
            bus_cpus = [int(c) for c in args.bus_cpus.split(",")] if args.bus_cpus else None
            figures = train_variant(args.variant, cfg, args.run_id, Pacer(args.block, control, report), bus_cpus)
        except TrainbusError as exc:
            print(f"bench worker ({args.variant}): {exc}", file=sys.stderr)
            return exc.exit_code
        report.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
