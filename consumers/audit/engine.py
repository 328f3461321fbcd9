"""The audit gate's rule engine: ``handle(event, state) -> (state, outputs)``, with no I/O and no clock.

Feed it every event of the stream in order (and ``Tick(now)`` every second for the stall rule);
it returns what to publish. The same events give the same outputs, which is what makes a
restarted auditor safe: it replays history through ``handle`` and publishes only the outputs
whose ``event_id`` is not in the stream yet (see ``consumers.audit.loop``).

A rule *fires* when its condition turns bad and stays *active* until the condition is healthy
again (one flag per episode, not one per step). A checkpoint's verdict is rejected when the
evaluation it is judged on fails a ``reject_checkpoint`` rule, or a ``reject_checkpoint``
flag of the same attempt was raised at or before its step and not cleared by then.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from consumers.audit.rules import EVAL_METRICS, AuditConfig, Best, Problem, Rule, eval_checks, train_checks
from runtime.publish.direct import event_id
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    Evaluation,
    Event,
    Heartbeat,
    RunFinished,
    RunStarted,
    RunState,
    TrainStep,
)


@dataclass(frozen=True)
class Tick:
    """The clock, fed by the loop every second (the engine never reads it itself)."""

    now: datetime


@dataclass(frozen=True)
class Publish:
    """An audit event to publish. The loop stamps ``seq`` and ``time``, and first sends ``commands``
    (``pause``/``stop``, recorded in the flag's ``actions_taken``) and writes ``records`` to the
    checkpoints bucket (key, JSON value)."""

    event: AuditFlag | AuditVerdict
    commands: tuple[Literal["pause", "stop"], ...] = ()
    records: tuple[tuple[str, dict[str, Any]], ...] = ()


@dataclass(frozen=True)
class Send:
    """A control command that is not tied to a flag (``evaluate`` for a checkpoint without an eval)."""

    command: Literal["evaluate"]
    run_id: str
    reason: str


Output = Publish | Send


@dataclass
class Episode:
    """A rule that fired and has not been healthy since (or was, at ``cleared_step``)."""

    rule: str
    flag_id: str
    attempt: int
    step: int
    message: str
    severity: str
    rejects: bool
    from_eval: bool
    cleared_step: int | None = None


@dataclass
class EvalSeen:
    """An evaluation, with the reasons it would reject a checkpoint."""

    event_id: str
    attempt: int
    step: int
    metrics: dict[str, float]
    failures: list[str]


@dataclass
class RunAudit:
    """What the engine remembers about one run."""

    run_id: str
    attempt: int = 1
    losses: deque[float] = field(default_factory=deque)
    best: Best | None = None
    active: dict[str, Episode] = field(default_factory=dict)
    closed: deque[Episode] = field(default_factory=lambda: deque(maxlen=500))
    evals: deque[EvalSeen] = field(default_factory=lambda: deque(maxlen=500))
    judged: set[str] = field(default_factory=set)
    pending: list[Checkpoint] = field(default_factory=list)
    heartbeat: Heartbeat | None = None
    stall_flagged: str | None = None
    finished: bool = False
    best_checkpoint: float | None = None


@dataclass
class AuditState:
    """The engine's state: the rules and one ``RunAudit`` per run seen."""

    config: AuditConfig
    runs: dict[str, RunAudit] = field(default_factory=dict)

    @property
    def rules(self) -> dict[str, Rule]:
        return self.config.rules.enabled()


def new_state(config: AuditConfig) -> AuditState:
    """An engine that has seen nothing yet."""
    return AuditState(config)


def handle(event: Event | Tick, state: AuditState) -> tuple[AuditState, list[Output]]:
    """Apply the rules to one event (or tick); returns the state and what to publish or send."""
    if isinstance(event, Tick):
        return state, _tick(event.now, state)
    react = HANDLERS.get(type(event))
    if react is None:
        return state, []
    run = state.runs.setdefault(event.run_id, RunAudit(event.run_id))
    if event.attempt > run.attempt:
        _new_attempt(run, event.attempt)
    return state, react(state, run, event)


def _new_attempt(run: RunAudit, attempt: int) -> None:
    """A resumed run reloads its weights: step-based history no longer applies."""
    run.attempt = attempt
    run.losses.clear()
    run.closed.extend(ep for ep in run.active.values() if not ep.from_eval)
    run.active.clear()


Judged = TrainStep | Evaluation | Heartbeat


def _judge(
    state: AuditState, run: RunAudit, rule_name: str, key: str, event: Judged, problem: Problem | None
) -> list[Output]:
    """Fire ``rule_name`` when ``problem`` starts an episode; clear the episode when it is gone."""
    if problem is None:
        episode = run.active.pop(key, None)
        if episode is not None:
            episode.cleared_step = event.step
            if not episode.from_eval:
                run.closed.append(episode)
        return []
    return [] if key in run.active else [_fire(state, run, rule_name, key, event, problem)]


def _fire(state: AuditState, run: RunAudit, rule_name: str, key: str, judged: Judged, problem: Problem) -> Publish:
    rule = state.rules[rule_name]
    flag = AuditFlag(
        event_id=event_id(run.run_id, "audit", rule_name, judged.event_id),
        run_id=run.run_id,
        attempt=judged.attempt,
        seq=1,
        source="audit",
        rule=rule_name,
        severity=rule.severity,
        step=judged.step,
        message=problem.message,
        judged_event_id=judged.event_id,
        value=problem.value,
        threshold=problem.threshold,
        actions=list(rule.actions),
    )
    rejects, from_eval = "reject_checkpoint" in rule.actions, judged.type == "eval"
    run.active[key] = Episode(
        rule_name, flag.event_id, judged.attempt, judged.step, problem.message, rule.severity, rejects, from_eval
    )
    commands: tuple[Literal["pause", "stop"], ...] = ()
    if "pause_run" in rule.actions:
        commands = ("pause",)
    elif "stop_run" in rule.actions:
        commands = ("stop",)
    return Publish(flag, commands=commands)


def _on_eval(state: AuditState, run: RunAudit, event: Evaluation) -> list[Output]:
    out: list[Output] = []
    failures: list[str] = []
    problems, run.best = eval_checks(event, run.best, state.rules)
    for rule_name, key, problem in problems:
        out += _judge(state, run, rule_name, key, event, problem)
        rule = state.rules[rule_name]
        if problem is not None and "reject_checkpoint" in rule.actions:
            failures.append(f"{rule_name} ({rule.severity}): {problem.message}")
    metrics = {name: float(v) for name in EVAL_METRICS if (v := getattr(event, name)) is not None}
    seen = EvalSeen(event.event_id, event.attempt, event.step, metrics, failures)
    run.evals.append(seen)
    waiting = [c for c in run.pending if c.attempt == event.attempt]
    run.pending = [c for c in run.pending if c.attempt != event.attempt]
    out += [_verdict(state, run, ckpt, seen) for ckpt in waiting]
    return out


def _on_checkpoint(state: AuditState, run: RunAudit, ckpt: Checkpoint) -> list[Output]:
    if ckpt.event_id in run.judged or any(c.event_id == ckpt.event_id for c in run.pending):
        return []
    seen = next((e for e in reversed(run.evals) if e.attempt == ckpt.attempt and e.step <= ckpt.step), None)
    if seen is None and state.config.evaluate_missing and not run.finished:
        run.pending.append(ckpt)
        return [Send("evaluate", run.run_id, f"audit: checkpoint at step {ckpt.step} has no evaluation to judge")]
    return [_verdict(state, run, ckpt, seen)]


def _blocking(run: RunAudit, attempt: int, step: int) -> list[Episode]:
    """``reject_checkpoint`` flags raised at or before ``step`` and not cleared by then."""
    episodes = [*run.closed, *run.active.values()]
    return [
        ep
        for ep in episodes
        if ep.rejects
        and not ep.from_eval
        and ep.attempt == attempt
        and ep.step <= step
        and (ep.cleared_step is None or ep.cleared_step > step)
    ]


def _verdict(state: AuditState, run: RunAudit, ckpt: Checkpoint, seen: EvalSeen | None) -> Publish:
    """The one verdict on ``ckpt``, judged on ``seen`` (or flags only) and the blocking flags."""
    run.judged.add(ckpt.event_id)
    reasons = list(seen.failures) if seen is not None else []
    reasons += [
        f"{ep.rule} ({ep.severity}): {ep.message}, not cleared by step {ckpt.step} (flag {ep.flag_id})"
        for ep in _blocking(run, ckpt.attempt, ckpt.step)
    ]
    metrics = dict(seen.metrics) if seen is not None else {}
    if seen is not None:
        metrics["eval_step"] = float(seen.step)
    verdict = AuditVerdict(
        event_id=event_id(run.run_id, "audit", "verdict", ckpt.event_id),
        run_id=run.run_id,
        attempt=ckpt.attempt,
        seq=1,
        source="audit",
        checkpoint_event_id=ckpt.event_id,
        checkpoint_step=ckpt.step,
        checkpoint_path=ckpt.path,
        verdict="rejected" if reasons else "approved",
        reasons=reasons,
        metrics=metrics,
        eval_event_id=seen.event_id if seen is not None else None,
    )
    if reasons:
        return Publish(verdict)
    return Publish(verdict, records=_records(state, run, ckpt, verdict))


def _records(state: AuditState, run: RunAudit, ckpt: Checkpoint, verdict: AuditVerdict) -> tuple[Any, ...]:
    """Bucket entries of an approved checkpoint: ``<run>.<step>`` and, when it is the best, ``<run>.best``."""
    key = f"{run.run_id}.{ckpt.step}"
    entry = {
        "run_id": run.run_id,
        "attempt": ckpt.attempt,
        "step": ckpt.step,
        "path": ckpt.path,
        "sha256": ckpt.sha256,
        "size_bytes": ckpt.size_bytes,
        "checkpoint_event_id": ckpt.event_id,
        "verdict_event_id": verdict.event_id,
        "eval_event_id": verdict.eval_event_id,
        "metrics": verdict.metrics,
    }
    records: list[tuple[str, dict[str, Any]]] = [(key, entry)]
    name, mode = state.config.best_metric, state.config.best_mode
    value = verdict.metrics.get(name)
    if value is not None and math.isfinite(value):
        best = run.best_checkpoint
        if best is None or (value > best if mode == "max" else value < best):
            run.best_checkpoint = value
            records.append((f"{run.run_id}.best", {**entry, "key": key, "metric": name, "value": value}))
    return tuple(records)


def _on_heartbeat(state: AuditState, run: RunAudit, beat: Heartbeat) -> list[Output]:
    """A heartbeat ends a stall; a gap longer than the limit is a stall even if no tick saw it."""
    out: list[Output] = []
    rule = state.config.rules.run_stalled
    previous = run.heartbeat
    if rule is not None and previous is not None and run.stall_flagged != previous.event_id:
        gap = (beat.time - previous.time).total_seconds()
        if gap > rule.seconds:
            out.append(_stall(state, run, previous, gap))
    run.heartbeat = beat
    out += _judge(state, run, "run_stalled", "run_stalled", beat, None)
    return out


def _stall(state: AuditState, run: RunAudit, last: Heartbeat, seconds: float) -> Publish:
    rule = state.config.rules.run_stalled
    assert rule is not None
    run.stall_flagged = last.event_id
    message = (
        f"the trainer has sent no heartbeat for {seconds:.0f} s (the limit is {rule.seconds:g} s); "
        f"the last one was at step {last.step}, while {last.phase}"
    )
    problem = Problem(message, seconds, rule.seconds)
    return _fire(state, run, "run_stalled", "run_stalled", last, problem)


def _on_train_step(state: AuditState, run: RunAudit, event: TrainStep) -> list[Output]:
    out: list[Output] = []
    for rule, key, problem in train_checks(event, run.losses, state.rules):
        out += _judge(state, run, rule, key, event, problem)
    return out


def _on_started(state: AuditState, run: RunAudit, event: RunStarted) -> list[Output]:
    run.finished = False
    return []


def _on_state(state: AuditState, run: RunAudit, event: RunState) -> list[Output]:
    return []  # only a newer attempt matters (``handle``)


def _on_finished(state: AuditState, run: RunAudit, event: RunFinished) -> list[Output]:
    """No evaluation comes any more: the checkpoints waiting for one are judged on their flags."""
    run.finished = True
    out: list[Output] = [_verdict(state, run, ckpt, None) for ckpt in run.pending]
    run.pending.clear()
    return out


HANDLERS: dict[type[Any], Callable[[AuditState, RunAudit, Any], list[Output]]] = {
    TrainStep: _on_train_step,
    Evaluation: _on_eval,
    Checkpoint: _on_checkpoint,
    Heartbeat: _on_heartbeat,
    RunStarted: _on_started,
    RunState: _on_state,
    RunFinished: _on_finished,
}
"""What each event the gate reads does to its run; any other event is passed over."""


def _tick(now: datetime, state: AuditState) -> list[Output]:
    rule = state.config.rules.run_stalled
    if rule is None:
        return []
    out: list[Output] = []
    for run in state.runs.values():
        beat = run.heartbeat
        if run.finished or beat is None or run.stall_flagged == beat.event_id:
            continue
        age = (now - beat.time).total_seconds()
        if age > rule.seconds:
            out.append(_stall(state, run, beat, age))
    return out
