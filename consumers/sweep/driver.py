"""The sweep driver: Optuna asks, each trial is an ordinary ``trainbus train`` run, the bus judges it.

Optuna keeps the search (sampler, pruner, storage); the driver owns each trial's work
(``study.ask()``/``study.tell()``): it starts ``trainbus train CONFIG --run-id <name>-t<k>
--sweep <name> --trial <k> --set key=value …`` as a subprocess (in its own session, so it
outlives the driver), or with ``--queue`` queues that run as a job for any `trainbus agent`
(``consumers.sweep.queued``), then only reads the run's events from the stream — it never imports
the trainer. Evaluations go to ``trial.report``; when the pruner says so the run gets a ``stop``
command (recorded in the stream like any other), or, while its job still waits for a slot, the
job is cancelled. ``consumers.sweep.judge`` decides the outcome.

Each trial carries the driver watching it and a lease that driver renews. A driver adopts every
running trial whose driver is gone (killed: its process no longer runs on this host, or its lease
expired) and judges it from the stream, so a restart continues where the last driver stopped,
while several live drivers of one study leave each other's trials alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import optuna
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from consumers.control_client import NoTrainer, build_command, send_command
from consumers.sweep.clock import TrialClock
from consumers.sweep.judge import TRAINER_EVENTS, Outcome, Report, StopRun, TrialWatch, handle, outcome
from consumers.sweep.launched import Launched
from consumers.sweep.progress import ON_A_TERMINAL, Progress
from consumers.sweep.queued import job_gone, trial_job, waiting, withdraw
from consumers.sweep.space import Space
from consumers.sweep.study import LEASE_RENEW, abandoned, describe_best, driver_identity, record_outcome
from runtime.bus.stream import decode
from runtime.cli.render import fmt
from runtime.errors import ConfigError
from runtime.launch.queue import enqueue
from runtime.lifecycle import STALL_AFTER_SECONDS
from runtime.logs import get_logger
from schemas import EVENTS_STREAM, run_events


@dataclass
class SweepOptions:
    """What ``trainbus sweep`` was asked to do."""

    name: str
    config: str
    space: Space
    trials: int
    parallel: int = 1
    overrides: list[str] = field(default_factory=list)
    """``--set`` items applied to every trial (the sampled values come after them, and win)."""
    verdict_timeout: float = 60.0
    stall_after: float = STALL_AFTER_SECONDS
    log_dir: Path = Path(".trainbus/sweeps")
    bus_url: str = ""
    """``NATS_URL`` for the trials: the bus the driver itself uses."""
    threads: int = 0
    """torch threads of each trial (``OMP_NUM_THREADS``), its share of the cores; 0: torch's default."""
    progress_every: float = ON_A_TERMINAL
    """Seconds between two progress lines while trials run."""
    queue: bool = False
    """Queue each trial as a job for the agents (``--queue``) instead of starting its trainer here."""


@dataclass
class Running:
    """A trial this driver watches (and, unless adopted, started)."""

    number: int
    watch: TrialWatch
    task: asyncio.Task[Outcome | None]
    launched: Launched

    @property
    def run_id(self) -> str:
        return self.watch.run_id


def trial_env(opts: SweepOptions) -> dict[str, str]:
    """A trial's environment: the driver's bus, and its share of the cores as torch threads
    (unless ``OMP_NUM_THREADS`` was set by the user, which wins)."""
    env = dict(os.environ)
    if opts.bus_url:
        env["NATS_URL"] = opts.bus_url
    if opts.threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    return env


def frozen_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def trial_handle(study: optuna.Study, number: int) -> optuna.trial.Trial:
    """A live ``Trial`` for trial ``number`` of ``study``: what ``study.ask()`` returns, for a trial
    asked by an earlier driver (Optuna has no public call for it; ``_trial_id`` is its key)."""
    return optuna.trial.Trial(study, frozen_trial(study, number)._trial_id)


class Sweep:
    """One driver process working on one study."""

    def __init__(self, opts: SweepOptions, study: optuna.Study, nc: NATS, out: Callable[..., None] = print) -> None:
        self.opts, self.study, self.nc, self.out = opts, study, nc, out
        self.js = nc.jetstream()
        self.issuer = f"sweep:{opts.name}"
        self.running: dict[int, Running] = {}
        self.bad_input: str | None = None
        self.log = get_logger(sweep=opts.name)
        self.me = driver_identity()
        self.progress = Progress(opts.space.metric, opts.progress_every)
        self.began = time.monotonic()

    def say(self, number: int, run_id: str, text: str) -> None:
        self.out(f"trial {number} (run {run_id}): {text}", flush=True)

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Adopt abandoned trials, start new ones up to ``trials``, judge each; returns the exit code."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._adopt()
                total = len(self.study.get_trials(deepcopy=False))
                if self.bad_input is None and total < self.opts.trials and len(self.running) < self.opts.parallel:
                    await self._start()
                    continue
                if not self.running:
                    break
                tasks = {r.task for r in self.running.values()}
                # wake up now and then to adopt the trials of a driver that died meanwhile
                await asyncio.wait({*tasks, stopper}, timeout=LEASE_RENEW, return_when=asyncio.FIRST_COMPLETED)
                for number, item in list(self.running.items()):
                    if item.task.done():
                        del self.running[number]
                        await self._finish(item, item.task.result())
                self._report_progress()
        finally:
            stopper.cancel()
            for item in self.running.values():
                item.task.cancel()
            # wait for the watches to unsubscribe before the caller closes the connection
            await asyncio.gather(*(item.task for item in self.running.values()), return_exceptions=True)
        if stop.is_set():
            left = ", ".join(r.run_id for r in self.running.values())
            self.out(
                f"sweep {self.opts.name}: stopped watching"
                + (f"; {left} keep running: the same command again judges them" if left else ""),
                flush=True,
            )
            return 130
        if self.bad_input is not None:
            raise ConfigError(self.bad_input)
        for line in describe_best(self.study):
            self.out(line, flush=True)
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return 0 if done else 1

    def _report_progress(self) -> None:
        """Each running trial's step and latest evaluation, every ``progress_every`` seconds."""
        now = time.monotonic()
        if self.running and self.progress.due(now):
            self.out(self.progress.line(self.opts.name, now - self.began), flush=True)

    def _adopt(self) -> None:
        """Watch every running trial of the study that has lost its driver."""
        now = time.time()
        for frozen in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            run_id = frozen.user_attrs.get("run_id")
            if frozen.number in self.running or not run_id or not abandoned(frozen, self.me, now):
                continue
            trial = trial_handle(self.study, frozen.number)
            trial.set_user_attr("driver", self.me)
            trial.set_user_attr("lease", now)
            self.say(frozen.number, run_id, "watching its run from the stream (its driver is gone)")
            seq, job_id = int(frozen.user_attrs.get("stream_seq", 1)), frozen.user_attrs.get("job_id")
            self._track(frozen.number, run_id, seq, Launched(job_id=job_id))

    async def _start(self) -> None:
        """Ask Optuna for a trial and start its run."""
        opts = self.opts
        self.study.sampler = opts.space.make_sampler(offset=len(self.study.get_trials(deepcopy=False)))
        trial = self.study.ask(dict(opts.space.parameters))
        run_id = f"{opts.name}-t{trial.number}"
        info = await self.js.stream_info(EVENTS_STREAM)
        start_seq = info.state.last_seq + 1  # a run id reused from an older sweep: its old events are not ours
        # owner first: another driver adopts a trial with a run id and no live owner
        trial.set_user_attr("driver", self.me)
        trial.set_user_attr("lease", time.time())
        trial.set_user_attr("stream_seq", start_seq)
        trial.set_user_attr("run_id", run_id)
        sampled = opts.space.overrides(trial.params)
        if opts.queue:
            launched = await self._queue(trial, run_id, sampled)
        else:
            launched = self._spawn(trial.number, run_id, sampled)
        self._track(trial.number, run_id, start_seq, launched)

    def _spawn(self, number: int, run_id: str, sampled: list[str]) -> Launched:
        """Start the trial's trainer here."""
        opts = self.opts
        argv = [sys.executable, "-m", "runtime.cli", "train", opts.config, "--run-id", run_id]
        argv += ["--sweep", opts.name, "--trial", str(number)]
        for item in [*opts.overrides, *sampled]:
            argv += ["--set", item]
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        log = opts.log_dir / f"{run_id}.log"
        env = trial_env(opts)
        with log.open("wb") as handle:
            # its own session: Ctrl-C or a kill of the driver leaves the run going; a new driver judges it
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.say(number, run_id, f"started: {' '.join(sampled)} (pid {process.pid}, log {log})")
        return Launched(process=process, log=log)

    async def _queue(self, trial: optuna.trial.Trial, run_id: str, sampled: list[str]) -> Launched:
        """Queue the trial's run as a job; an agent with a free slot trains it."""
        spec = trial_job(self.opts.name, trial.number, run_id, self.opts.config, [*self.opts.overrides, *sampled])
        await enqueue(self.js, spec)
        trial.set_user_attr("job_id", spec.job_id)
        self.say(trial.number, run_id, f"queued as job {spec.job_id}: {' '.join(sampled)}")
        return Launched(job_id=spec.job_id)

    def _track(self, number: int, run_id: str, seq: int, launched: Launched) -> None:
        watch = TrialWatch(run_id, self.opts.space.metric, self.issuer)
        task = asyncio.ensure_future(self._watch(number, watch, launched, seq))
        self.running[number] = Running(number, watch, task, launched)

    async def _finish(self, item: Running, result: Outcome | None) -> None:
        """Tell Optuna the judgement; wait for the trainer to exit so the next trial gets its CPU."""
        self.progress.drop(item.number)
        if result is None or not self._tell(item.number, result):
            # another driver watched the same run and told Optuna first (the same stream gives the
            # same judgement): nothing to add
            self.say(item.number, item.run_id, "judged by another driver of this sweep")
        elif result.state == "complete":
            where = f" (checkpoint {result.checkpoint}, {result.verdict})" if result.checkpoint else ""
            self.say(item.number, item.run_id, f"complete: {self.opts.space.metric} {fmt(result.value)}{where}")
        else:
            self.say(
                item.number, item.run_id, result.reason if result.state == "pruned" else f"failed: {result.reason}"
            )
        await item.launched.reap()
        why = item.launched.refusal(item.watch)
        if why is not None and self.bad_input is None:
            self.bad_input = f"trial {item.number} ({item.run_id}): {why}"

    def _tell(self, number: int, result: Outcome) -> bool:
        """Record the judgement in the study; False when the trial was already finished there."""
        attrs = {"reason": result.reason, "checkpoint": result.checkpoint, "verdict": result.verdict}
        return record_outcome(self.study, number, result.state, result.value, **attrs)

    # ---- one trial -----------------------------------------------------------------------

    async def _watch(self, number: int, watch: TrialWatch, launched: Launched, start_seq: int) -> Outcome | None:
        """Follow the run's events from ``start_seq`` until ``judge.outcome`` has a judgement
        (None: another driver of the study judged the trial first)."""
        trial = trial_handle(self.study, number)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        sub = await self.js.subscribe(run_events(watch.run_id), stream=EVENTS_STREAM, ordered_consumer=True, config=config)  # fmt: skip
        loop = asyncio.get_running_loop()
        clock = TrialClock(loop.time(), self.opts.stall_after, self.opts.verdict_timeout)
        reported = set(frozen_trial(self.study, number).intermediate_values)
        followed = Followed(number, watch, trial, reported, clock)
        try:
            while True:
                msg = await _next_msg(sub)
                now = loop.time()
                if clock.renew_due(now) and not _renew(trial):
                    return None
                if msg is not None and await self._take(msg, followed, now):
                    continue  # judge on the whole stored history, not half of it
                waited = clock.verdict_waited(now, watch.finished is not None)
                result = outcome(watch, verdict_waited=waited, gone=launched.gone(clock, now, watch))
                if result is not None:
                    if waited:
                        self._judged_without_verdict(watch)
                    return result
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _take(self, msg: Msg, followed: Followed, now: float) -> bool:
        """Take one stored message of the run; True while more are stored behind it."""
        item = decode(msg, msg.metadata.sequence.stream)
        if item.event is not None:
            if item.event.type in TRAINER_EVENTS:
                followed.clock.heard_trainer(now)
            self.progress.saw(followed.number, item.event)
            for action in handle(item.event, followed.watch):
                await self._act(action, followed)
        return bool(msg.metadata.num_pending)

    def _judged_without_verdict(self, watch: TrialWatch) -> None:
        if watch.checkpoint is not None and watch.last_verdict is None:
            self.log.warning(
                "no audit verdict on the last checkpoint; judged without one (is the audit gate running?)",
                run_id=watch.run_id,
                waited_seconds=self.opts.verdict_timeout,
            )

    async def _act(self, action: Report | StopRun, followed: Followed) -> None:
        number, watch, trial, reported = followed.number, followed.watch, followed.trial, followed.reported
        if isinstance(action, StopRun):
            await self._stop(number, watch, action.reason)
            return
        if action.step not in reported:  # a restarted driver replays what the last one reported
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # told by another driver
                trial.report(action.value, action.step)
            reported.add(action.step)
        if not action.last and watch.stop_requested is None and watch.finished is None and trial.should_prune():
            metric = self.opts.space.metric
            await self._stop(number, watch, f"pruned at step {action.step} ({metric} {fmt(action.value)})")

    async def _stop(self, number: int, watch: TrialWatch, reason: str) -> None:
        """Send ``stop`` (no checkpoint: the trial is over) like ``trainbus ctl stop --no-save``."""
        if watch.stop_requested is not None:
            return
        watch.stop_requested = reason
        job = watch.job
        if job is not None and waiting(job):  # no trainer yet: the job leaves the queue
            self.say(number, watch.run_id, f"{reason}; {await withdraw(self.js, job.job_id)}")
            return
        command = build_command("stop", watch.run_id, issued_by=self.issuer, reason=reason[:500], save=False)
        try:
            reply, _ = await send_command(self.nc, command)
        except NoTrainer as exc:
            if job is not None and not job_gone(job):  # its agent is starting the trainer: the agent stops it
                said = await withdraw(self.js, job.job_id)
            else:
                said = f"could not stop it: {exc}"
            self.say(number, watch.run_id, f"{reason}; {said}")
            return
        self.say(number, watch.run_id, f"stop {reply.status}: {reason}")


@dataclass
class Followed:
    """One trial as its watch follows it: Optuna's handle, the steps already reported to it, its clock."""

    number: int
    watch: TrialWatch
    trial: optuna.trial.Trial
    reported: set[int]
    clock: TrialClock


async def _next_msg(sub: JetStreamContext.PushSubscription) -> Msg | None:
    """The next stored or live message of the run, or None after a second without one."""
    try:
        return await sub.next_msg(timeout=1.0)
    except (TimeoutError, nats.errors.TimeoutError):
        return None


def _renew(trial: optuna.trial.Trial) -> bool:
    """Renew this driver's lease on the trial; False once the study has it finished (another driver judged it)."""
    try:
        trial.set_user_attr("lease", time.time())
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True
