"""`trainbus bench predict`: the predictor's latency and throughput, over the bus and in-process.

    trainbus bench predict [--clients 1,8,32] [--seconds 2] [--rounds 3] [--threads 1]

Builds a tiny run in a temp dir (the tiny default's base model with two LoRA adapters standing
in for two checkpoints), publishes what the trainer and the audit gate would (run.started, the
checkpoints, approved verdicts, the bucket's best pointer) to an embedded nats-server, and
starts `trainbus serve` on it. Then, for each number of concurrent clients, turns of the same
load go alternately to the service over the bus and to the same checkpoint loaded in this
process behind the same micro-batcher (no bus): p50/p99 latency and requests/s of both, side by
side. Last, the clients keep sending over the bus while the best pointer flips between the two
checkpoints: every request must be answered. Requests carry one text and ``rationale: false``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.common import log_tail, percentile
from consumers.predict.batching import MicroBatcher
from consumers.predict.checkpoints import best_key, choose
from consumers.predict.config import ServeConfig
from producers.config import RunConfig
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.checkpoints import fingerprint
from runtime.settings import Settings, load_config
from schemas import AuditVerdict, Checkpoint, Hyperparameters, RunStarted, event_subject
from schemas.predict import PredictRequest
from schemas.subjects import CHECKPOINTS_BUCKET, predict_subject

RUN_ID = "bench-predict"
Latencies = list[float]


def register(sub: Any) -> None:
    """Add ``predict`` to `trainbus bench` (the ``trainbus.benchmarks`` entry-point group)."""
    p = sub.add_parser("predict", help="predictor p50/p99 latency and requests/s over the bus vs in-process")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated (default 1,8,32)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one turn (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="turns per path and client count (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each model (default 1)")
    p.add_argument("--swap-seconds", type=float, default=10.0, help="length of the hot-swap phase (default 10)")
    p.set_defaults(func=bench_predict)


# ---- a run to serve ----------------------------------------------------------------------


def make_run(root: Path) -> tuple[RunConfig, list[Path]]:
    """The tiny default's base model and two random LoRA adapters saved as checkpoints 1 and 2."""
    import torch

    from producers.task.model import apply_adapter, load_model_and_tokenizer, prepare_base_model

    shipped = Path(__file__).resolve().parents[2] / "configs/tiny.yaml"
    cfg = load_config(RunConfig, shipped) if shipped.is_file() else RunConfig()
    cfg.data.labels_file = str(Path(__file__).resolve().parents[2] / "configs/labels.yaml")
    run_dir = root / RUN_ID
    base = prepare_base_model(cfg.model, run_dir, cfg.training.seed)
    folders = []
    for step in (1, 2):
        model, _ = load_model_and_tokenizer(cfg.model, base)
        model = apply_adapter(model, cfg.adapter, total_steps=10)
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():  # a fresh LoRA B is zero: give each "checkpoint" its own answers
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        folder = run_dir / f"checkpoint-{step}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return cfg, folders


async def publish_run(js: Any, cfg: RunConfig, folders: list[Path]) -> None:
    """What the trainer and the audit gate would have published for these checkpoints."""
    events: list[Any] = [
        RunStarted(
            event_id=f"{RUN_ID}.1.1",
            run_id=RUN_ID,
            seq=1,
            config=cfg.model_dump(mode="json"),
            config_hash="bench",
            model="tiny",
            adapter=cfg.adapter.method,
            data_fingerprint="bench",
            hyperparameters=Hyperparameters(learning_rate=cfg.training.learning_rate),
        )
    ]
    kv = await js.create_key_value(bucket=CHECKPOINTS_BUCKET, history=5)
    for i, folder in enumerate(folders, start=1):
        sha, size = fingerprint(folder)
        ckpt = Checkpoint(
            event_id=f"{RUN_ID}.1.{i + 1}",
            run_id=RUN_ID,
            seq=i + 1,
            step=i,
            path=str(folder),
            sha256=sha,
            size_bytes=size,
        )
        verdict = AuditVerdict(
            event_id=f"{RUN_ID}.audit.verdict.{ckpt.event_id}",
            run_id=RUN_ID,
            seq=i,
            source="audit",
            checkpoint_event_id=ckpt.event_id,
            checkpoint_step=i,
            checkpoint_path=str(folder),
            verdict="approved",
        )
        events += [ckpt, verdict]
        entry = {"run_id": RUN_ID, "step": i, "path": str(folder), "sha256": sha, "checkpoint_event_id": ckpt.event_id}
        await kv.put(f"{RUN_ID}.{i}", json.dumps(entry).encode())
    for event in events:
        await js.publish(event_subject(RUN_ID, event.type), event.model_dump_json().encode())
    await point_best(kv, 1)


async def point_best(kv: Any, step: int) -> None:
    """Move the run's best pointer to checkpoint ``step``, as the audit gate does."""
    entry = json.loads((await kv.get(f"{RUN_ID}.{step}")).value)
    await kv.put(best_key(RUN_ID), json.dumps({**entry, "key": f"{RUN_ID}.{step}"}).encode())


# ---- load --------------------------------------------------------------------------------


async def drive(call: Callable[[int], Awaitable[bool]], clients: int, seconds: float) -> tuple[Latencies, int, float]:
    """``clients`` loops calling ``call`` back to back for ``seconds``: (latencies of successes, failures, elapsed)."""
    latencies: Latencies = []
    failures = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client(k: int) -> None:
        nonlocal failures
        i = k
        while loop.time() < deadline:
            start = time.perf_counter()
            ok = await call(i)
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1
            i += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, failures, time.perf_counter() - start


def bench_texts(folder: Path) -> list[str]:
    """The sample data set's texts, all different: no request repeats one the model just saw."""
    from producers.task.sampledata import write_sample_data

    write_sample_data(folder)
    rows = [json.loads(line) for name in ("validation", "test") for line in (folder / f"{name}.jsonl").open()]
    return [row["text"] for row in rows]


class ServeProcess:
    """`trainbus serve` on the bench run; its stdout lines are kept."""

    def __init__(self, url: str, log: Path, threads: int) -> None:
        env = {**os.environ, "NATS_URL": url, "OMP_NUM_THREADS": str(threads)}
        argv = [sys.executable, "-m", "runtime.cli", "serve", "--run", RUN_ID, "--threads", str(threads)]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.log, self.lines = log, []  # type: ignore[var-annotated]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_serving(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while sum("serving run" in line for line in self.lines) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"trainbus serve did not come up: {log_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _row(clients: int, path: str, latencies: Latencies, elapsed: float, failures: int) -> dict[str, Any]:
    return {
        "clients": clients,
        "path": path,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        "rps": len(latencies) / elapsed,
        "failed": failures,
    }


async def _measure(url: str, args: argparse.Namespace, serve: ServeProcess, texts: list[str]) -> int:
    from consumers.predict.serving import Job, answer_jobs, load_served

    settings = Settings()
    nc = await connect(BusTarget([url], "bench"), settings, name="bench-predict")
    js = nc.jetstream()
    payloads = [PredictRequest(text=t, rationale=False).model_dump_json().encode() for t in texts]
    subject = predict_subject(RUN_ID)

    async def over_bus(i: int) -> bool:
        try:
            msg = await nc.request(subject, payloads[i % len(payloads)], timeout=10)
        except Exception:
            return False
        return not (msg.headers or {}).get("Nats-Service-Error-Code")

    served = await asyncio.to_thread(
        load_served, await choose(js, RUN_ID, best={"checkpoint_event_id": f"{RUN_ID}.1.2"})
    )
    config = ServeConfig()  # what `trainbus serve` runs with
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        lambda jobs: answer_jobs(served, jobs, config.rationale_tokens),
        max_batch=config.max_batch,
        max_wait=config.max_wait_ms / 1000,
        size=lambda j: len(j.texts),
    ).start()
    jobs = [Job((t,), {}, False) for t in texts]

    async def in_process(i: int) -> bool:
        await batcher.submit(jobs[i % len(jobs)])
        return True

    await drive(over_bus, 1, 1.0)  # warm both paths up
    await drive(in_process, 1, 1.0)
    rows: list[dict[str, Any]] = []
    for clients in [int(c) for c in args.clients.split(",")]:
        measured: dict[str, tuple[Latencies, int, float]] = {"in-process": ([], 0, 0.0), "bus": ([], 0, 0.0)}
        for _ in range(args.rounds):
            for path, call in (("in-process", in_process), ("bus", over_bus)):
                lat, failed, elapsed = await drive(call, clients, args.seconds)
                old = measured[path]
                measured[path] = (old[0] + lat, old[1] + failed, old[2] + elapsed)
        rows += [
            _row(clients, path, latencies, elapsed, failed) for path, (latencies, failed, elapsed) in measured.items()
        ]
    await batcher.close()
    swap = await _hot_swap(js, over_bus, max(int(c) for c in args.clients.split(",")), args.swap_seconds, serve)
    await nc.close()
    _report(rows, swap)
    return 0


async def _hot_swap(
    js: Any, call: Callable[[int], Awaitable[bool]], clients: int, seconds: float, serve: ServeProcess
) -> dict[str, Any]:
    kv = await js.key_value(CHECKPOINTS_BUCKET)
    loads_before = sum("serving run" in line for line in serve.lines)
    load = asyncio.ensure_future(drive(call, clients, seconds))
    flips, step = 0, 1
    while not load.done():
        await asyncio.sleep(min(2.0, seconds / 4))
        if load.done():
            break
        step = 2 if step == 1 else 1
        await point_best(kv, step)
        flips += 1
    latencies, failures, _elapsed = await load
    loads = sum("serving run" in line for line in serve.lines) - loads_before
    return {
        "requests": len(latencies) + failures,
        "failed": failures,
        "flips": flips,
        "loads": loads,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def _report(rows: list[dict[str, Any]], swap: dict[str, Any]) -> None:
    print(f"{'clients':>7}  {'path':<10}  {'p50 ms':>7}  {'p99 ms':>7}  {'req/s':>7}  failed")
    for r in rows:
        print(
            f"{r['clients']:>7}  {r['path']:<10}  {r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {r['rps']:>7.1f}  {r['failed']}"
        )
    by = {(r["clients"], r["path"]): r for r in rows}
    counts = sorted({r["clients"] for r in rows})
    for n in counts:
        print(
            f"bus adds at p50 with {n} client(s): {by[(n, 'bus')]['p50_ms'] - by[(n, 'in-process')]['p50_ms']:+.2f} ms"
        )
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        for path in ("bus", "in-process"):
            gain = by[(hi, path)]["rps"] / by[(lo, path)]["rps"]
            print(f"{path}: {hi} clients reach {gain:.2f}x the requests/s of {lo}")
    print(
        f"hot swap under load: {swap['requests']} requests, {swap['failed']} failed, "
        f"{swap['flips']} pointer moves, {swap['loads']} loads, p99 {swap['p99_ms']:.1f} ms"
    )
    print(
        "targets: 1 client p99 <= 20 ms; bus adds <= 1 ms at p50; 32 clients >= 3x one client's req/s; 0 failed in the swap"
    )


def bench_predict(args: argparse.Namespace) -> int:
    import torch  # here, not at import: every `trainbus` command loads the benchmarks' parsers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-predict-") as tmp:
        root = Path(tmp)
        server = start_server(Settings().server, root / "nats", lock=False)
        serve: ServeProcess | None = None
        try:
            cfg, folders = make_run(root / "runs")

            async def setup() -> None:
                nc = await connect(BusTarget([server.url], "bench"), Settings(), name="bench-setup")
                await ensure_stream(nc.jetstream(), Settings().stream)
                await publish_run(nc.jetstream(), cfg, folders)
                await nc.close()

            asyncio.run(setup())
            serve = ServeProcess(server.url, root / "serve.log", args.threads)
            serve.wait_serving(1)
            print(
                f"bench predict: tiny model, {args.threads} torch thread(s) per model, {args.rounds} x {args.seconds:g} s turns"
            )
            return asyncio.run(_measure(server.url, args, serve, bench_texts(root / "data")))
        finally:
            if serve is not None:
                serve.stop()
            server.stop()
