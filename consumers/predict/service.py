"""The predictor on the bus: a ``nats.micro`` service answering ``trainbus.predict.<alias>``.

Requests are validated in the endpoint handler (a bad one is answered at once with the service
error headers) and then micro-batched onto the served model; the handler returns without waiting,
so the next request is read while the model works. Following the audit gate's ``<run>.best``
pointer, a new checkpoint is verified and loaded beside the one serving, then swapped in between
two batches: a request in flight finishes on the model it started on, none fails. Every load is
announced with a ``predictor.loaded`` event. Until a first checkpoint is served it says what it
waits for, every minute; a finished run whose checkpoints were all rejected ends it (exit 2, see
``consumers.predict.waiting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import EndpointStats, Service
from pydantic import ValidationError

from consumers.predict.announce import announce
from consumers.predict.batching import MicroBatcher
from consumers.predict.checkpoints import (
    Chosen,
    best_key,
    choose,
    localize,
    open_bucket,
    parse_best,
    run_progress,
    verify,
)
from consumers.predict.client import SERVICE_NAME, describe_invalid
from consumers.predict.config import ServeConfig
from consumers.predict.quiet import say_loading
from consumers.predict.serving import Job, Served, answer_jobs, load_served, too_long
from consumers.predict.waiting import SAY_EVERY, Every, nothing_to_serve, waiting_line
from runtime.errors import TrainbusError
from runtime.logs import get_logger
from schemas.predict import Answer, PredictReply, PredictRequest
from schemas.subjects import predict_subject

QUEUE_GROUP = "trainbus-predict"


@dataclass(frozen=True)
class Target:
    """What one ``trainbus serve`` process serves: a run's checkpoints under an alias."""

    run_id: str
    alias: str
    force: bool = False
    """Serve a best pointer's checkpoint even if its verdict is not ``approved`` (never the case today)."""


class NothingToServe(TrainbusError):
    """The run has finished and the audit gate approved none of its checkpoints: waiting cannot end."""

    exit_code = 2


class BestUpdates:
    """The entries a watcher of ``<run>.best`` delivers, and ``stop``, in one queue."""

    def __init__(self, watcher: Any, stop: asyncio.Event) -> None:
        self.watcher = watcher
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: stop
        loop = asyncio.get_running_loop()
        self.watching = loop.create_task(self._watch())
        self.stopping = loop.create_task(self._stop(stop))

    async def _watch(self) -> None:
        async for entry in self.watcher:
            best = parse_best(entry.value) if entry is not None and not entry.operation else None
            if best is not None:
                self.queue.put_nowait(best)

    async def _stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.queue.put_nowait(None)

    async def newest(self, timeout: float) -> dict[str, Any] | None:
        """The newest entry that came (one superseded while loading is skipped), None to stop (asked,
        or the watcher ended); ``TimeoutError`` when nothing came within ``timeout`` seconds."""
        try:
            items = [await asyncio.wait_for(self.queue.get(), timeout)]
        except TimeoutError:
            if not self.watching.done():
                raise
            self.watching.result()  # the watcher ended: raise what ended it
            return None
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return None if None in items else items[-1]

    async def close(self) -> None:
        await self.watcher.stop()
        self.watching.cancel()
        self.stopping.cancel()


class Predictor:
    """The served checkpoint, the batcher in front of it, and the handlers of the service."""

    def __init__(self, nc: NATS, target: Target, config: ServeConfig) -> None:
        self.nc, self.js, self.target, self.config = nc, nc.jetstream(), target, config
        self.served: Served | None = None
        self.batcher: MicroBatcher[Job, list[Answer]] = MicroBatcher(
            self._run_batch, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000, size=lambda j: len(j.texts)
        )
        self.service: Service | None = None
        self.metadata: dict[str, str] = {"alias": target.alias, "run_id": target.run_id}
        self.inflight: set[asyncio.Task[None]] = set()
        self.failed = 0
        self.loads = 0
        self.said: set[str] = set()
        self.say_waiting = Every(SAY_EVERY)
        self.log = get_logger(consumer="predict", alias=target.alias, run_id=target.run_id)

    # ---- requests ---------------------------------------------------------------------------

    def _run_batch(self, jobs: list[Job]) -> list[list[Answer]]:
        served = self.served  # read once: a swap during this batch affects the next one
        assert served is not None
        return answer_jobs(served, jobs, self.config.rationale_tokens)

    async def on_request(self, request: Request) -> None:
        """Validate, then hand the job to the batcher and return; a task sends the answer."""
        served = self.served
        assert served is not None  # the endpoint is added once the first checkpoint is loaded
        try:
            req = PredictRequest.model_validate_json(request.data)
        except ValidationError as exc:
            raise ServiceError("400", describe_invalid(exc)) from None
        job = Job(tuple([req.text] if req.text is not None else req.texts or []), dict(req.metadata), req.rationale)
        long = too_long(served, job)
        if long is not None:
            where = "text" if req.text is not None else f"texts.{long[0]}"
            raise ServiceError(
                "413", f"{where}: {long[1]} tokens with the prompt; this model reads at most {served.prompt_limit}"
            )
        task = asyncio.get_running_loop().create_task(self._answer(request, job))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _answer(self, request: Request, job: Job) -> None:
        try:
            answers = await self.batcher.submit(job)
        except Exception as exc:
            self.failed += 1
            self.log.error("batch failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            await request.respond_error("500", f"the model failed: {type(exc).__name__}")
            return
        await request.respond(PredictReply(answers=answers).model_dump_json().encode())

    def stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        """The ``data`` of ``$SRV.STATS``: batching, failures and what is served."""
        stats = self.batcher.stats
        return {
            "batches": stats.batches,
            "texts": stats.items,
            "largest_batch": stats.largest,
            "mean_batch": round(stats.items / stats.batches, 2) if stats.batches else 0.0,
            "failed_requests": self.failed,
            "loads": self.loads,
            "checkpoint": self.served.ref.model_dump() if self.served else None,
        }

    # ---- loading ----------------------------------------------------------------------------

    async def load(self, chosen: Chosen) -> Served:
        """Verify and load ``chosen`` off the event loop, swap it in, announce it."""
        previous = self.served
        started = time.monotonic()
        chosen = await localize(self.js, chosen)
        say_loading("serve", chosen)
        served = await asyncio.to_thread(self._verified_load, chosen)
        self.served = served
        self.loads += 1
        # INFO shows what serves now, and the metadata keys (with the values seen) a request may add
        self.metadata.update(
            step=str(chosen.step), sha256=chosen.sha256, metadata_seen=json.dumps(chosen.metadata_seen, sort_keys=True)
        )
        if self.service is None:
            self.service = await add_service(
                self.nc,
                name=SERVICE_NAME,
                version=version("trainbus"),
                description="trainbus predictor: audit-approved checkpoints answering risk classification requests",
                stats_handler=self.stats,
            )
            await self.service.add_endpoint(
                name="predict",
                subject=predict_subject(self.target.alias),
                queue_group=QUEUE_GROUP,
                handler=self.on_request,
                metadata=self.metadata,
            )
        event = await announce(
            self.js,
            chosen,
            alias=self.target.alias,
            subject=predict_subject(self.target.alias),
            instance=self.service.id,
            number=self.loads,
            host=socket.gethostname(),
            load_seconds=time.monotonic() - started,
            previous_step=previous.ref.step if previous else None,
            metadata_seen=chosen.metadata_seen,
        )
        self.log.info(
            "serving", step=chosen.step, sha256=chosen.sha256, verdict=chosen.verdict, announced=event is not None
        )
        print(
            f"trainbus serve: serving run {chosen.run_id} step {chosen.step} ({chosen.verdict}"
            f"{', forced' if chosen.forced else ''}, sha256 {chosen.sha256[:12]}) on {predict_subject(self.target.alias)}",
            flush=True,
        )
        return served

    def _verified_load(self, chosen: Chosen) -> Served:
        if chosen.event_id is not None:
            verify(chosen)
        try:
            return load_served(chosen, labels_file=self.config.labels_file)
        except TrainbusError:
            raise
        except Exception as exc:  # a broken checkpoint folder: one line, not a traceback
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise TrainbusError(f"cannot load {chosen.path}: {detail}") from None

    async def follow_best(self, stop: asyncio.Event) -> None:
        """Serve the run's best checkpoint, and each new one the audit gate names, until ``stop``.

        Until one is served it says what it waits for, at once and every minute; raises
        ``NothingToServe`` when the run has finished and the audit gate approved none of its checkpoints.
        """
        bucket = await self._wait_for_bucket(stop)
        if bucket is None:
            return
        updates = BestUpdates(await bucket.watch(best_key(self.target.run_id)), stop)
        try:
            while (best := await self._next_best(updates)) is not None:
                if self.served is None or self.served.chosen.event_id != best["checkpoint_event_id"]:
                    await self._swap(best)
        finally:
            await updates.close()

    async def _next_best(self, updates: BestUpdates) -> dict[str, Any] | None:
        """The newest ``best`` entry (None: stop), saying meanwhile what is awaited."""
        while True:
            try:
                return await updates.newest(timeout=2.0)
            except TimeoutError:
                await self._still_waiting()

    async def _still_waiting(self) -> None:
        """With nothing served: say what the predictor waits for (at once, then every minute), or
        raise ``NothingToServe`` when that can no longer come."""
        if self.served is not None or not self.say_waiting.due(time.monotonic()):
            return
        progress = await run_progress(self.js, self.target.run_id)
        never = nothing_to_serve(progress)
        if never is not None:
            raise NothingToServe(never)
        self.log.info("waiting", detail=waiting_line(progress))
        print(f"trainbus serve: {waiting_line(progress)}", flush=True)

    async def _swap(self, best: dict[str, Any]) -> None:
        try:
            chosen = await choose(self.js, self.target.run_id, best=best, force=self.target.force)
            await self.load(chosen)
        except Exception as exc:  # keep serving what is loaded; say why the new one is not
            reason = str(exc) if isinstance(exc, TrainbusError) else f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.log.error("not loading the new best checkpoint", error=reason)
            print(f"trainbus serve: not loading the new best checkpoint: {reason}", flush=True)

    async def _wait_for_bucket(self, stop: asyncio.Event) -> Any:
        """The audit gate's bucket once it exists (a fresh bus has none until the gate starts)."""
        while not stop.is_set():
            bucket = await open_bucket(self.js)
            if bucket is not None:
                return bucket
            self._say_once("waiting for the audit gate's checkpoint bucket (start `trainbus audit`)")
            await self._still_waiting()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
        return None

    def _say_once(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            print(f"trainbus serve: {message}", flush=True)

    # ---- shutdown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking requests, answer every request already received, then stop the model worker."""
        if self.service is not None:
            # nats.micro's stop() unsubscribes and drops requests already received; a drain answers them
            for endpoint in self.service._endpoints:
                if endpoint._subscription is not None:
                    await endpoint._subscription.drain()
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        await self.batcher.close()


async def serve(
    nc: NATS,
    target: Target,
    config: ServeConfig,
    *,
    stop: asyncio.Event,
    chosen: Chosen | None = None,
) -> Predictor:
    """Serve ``chosen`` (a pinned checkpoint), else follow the run's best one, until ``stop`` is set.

    Returns the predictor (its stats) after a clean shutdown: every request received is answered.
    """
    predictor = Predictor(nc, target, config)
    predictor.batcher.start()
    try:
        if chosen is not None:
            await predictor.load(chosen)
            await stop.wait()
        else:
            await predictor.follow_best(stop)
    finally:
        await predictor.close()
    return predictor
