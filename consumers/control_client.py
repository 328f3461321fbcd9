"""The operator's side of the control channel: `trainbus ctl` and ``send_command`` for other consumers.

A command is a request on ``trainbus.control.<run_id>``; the trainer answers at once
(``accepted``/``rejected``). With ``wait`` the client also waits for the ``command.result``
event with status ``applied`` (or ``rejected``: the run ended before applying it, exit 2), and
for ``evaluate``/``save_checkpoint`` for what it produced: the ``eval`` event (its metrics are
printed) or the ``checkpoint`` event (its path); a save at a step saved already names that
checkpoint, which is not written again. What is printed names the action as typed (``save``,
``eval``). No answer means no trainer is listening for that run: when the stream holds the run's
``run.finished`` the client says how it ended (``run R completed at step N``, exit 2), else that
nobody listens (exit 3); a server that denies this user says so in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from runtime.bus.connect import bus_target, connect, issuer
from runtime.bus.stream import last_event
from runtime.cli.args import add_settings_args, settings_from
from runtime.cli.render import summary
from runtime.errors import BusUnavailable, ConfigError, TrainbusError
from runtime.logs import get_logger
from runtime.settings import did_you_mean, parse_override
from schemas import (
    COMMAND_ADAPTER,
    Checkpoint,
    Command,
    CommandReply,
    CommandResult,
    Evaluation,
    Event,
    NewerSchema,
    RunFinished,
    SetHyperparameters,
    check_run_id,
    control_subject,
    event_subject,
    parse_event,
    run_events,
)
from schemas.commands import CommandBase

ACTIONS = {
    "pause": "pause",
    "resume": "resume",
    "stop": "stop",
    "save": "save_checkpoint",
    "eval": "evaluate",
    "set": "set",
}
TYPED = {kind: action for action, kind in ACTIONS.items()}


class NoTrainer(TrainbusError):
    """Nobody answered on the run's control subject."""

    exit_code = 3


class RunEnded(NoTrainer):
    """Nobody answered because the run is over: its latest attempt published ``run.finished``."""

    exit_code = 2


class Rejected(TrainbusError):
    """The trainer rejected the command."""

    exit_code = 2


def default_issuer() -> str:
    """The NATS user we connect as, else the OS user."""
    return issuer()


SETTABLE = [name for name in SetHyperparameters.model_fields if name not in CommandBase.model_fields and name != "type"]
"""What ``trainbus ctl set`` may change while a run trains."""


def build_command(
    action: str,
    run_id: str,
    *,
    issued_by: str,
    reason: str = "",
    settings: Sequence[str] = (),
    save: bool = True,
) -> Command:
    """A validated command; bad values raise ``ConfigError`` naming the field."""
    fields: dict[str, Any] = {
        "type": ACTIONS[action],
        "command_id": f"{issued_by[:40]}-{uuid.uuid4().hex[:12]}".replace(" ", "_"),
        "run_id": run_id,
        "issued_by": issued_by,
        "reason": reason,
    }
    if action == "stop":
        fields["save"] = save
    for item in settings:
        path, value = parse_override(item)
        fields[".".join(path)] = value
    try:
        return COMMAND_ADAPTER.validate_python(fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"][1:]) or action
            if err["type"] == "extra_forbidden" and action == "set":
                hint = did_you_mean(where, SETTABLE)
                problems.append(f"{where}: not a setting that can change while a run trains{hint}")
            else:
                problems.append(f"{where}: {err['msg']}")
        if any("not a setting" in p for p in problems):
            problems.append(f"settable: {', '.join(SETTABLE)}")
        raise ConfigError("; ".join(problems)) from None


PRODUCES: dict[str, type[Evaluation] | type[Checkpoint]] = {"evaluate": Evaluation, "save_checkpoint": Checkpoint}
"""Commands whose ``--wait`` also waits for what they produce."""


def _readable(data: bytes) -> Event | None:
    """An event this client can read, else None: a malformed or newer-schema one is skipped, not a crash."""
    try:
        return parse_event(data)
    except (ValidationError, NewerSchema) as exc:
        get_logger().debug("skipped an event ctl cannot read", error=str(exc).splitlines()[0])
        return None


def _produced(seen: list[Event], command: Command, step: int | None) -> Evaluation | Checkpoint | None:
    """The eval or checkpoint a command made: triggered by a command at (or after) its step."""
    kind = PRODUCES.get(command.type)
    for event in seen:
        if isinstance(event, kind or ()) and event.trigger == "command" and (step is None or event.step >= step):
            return event
    return None


async def send_command(
    nc: NATS, command: Command, *, timeout: float = 5.0, wait: bool = False, wait_timeout: float = 60.0
) -> tuple[CommandReply, CommandResult | None]:
    """Send ``command``; return the trainer's reply and (with ``wait``) the ``applied`` result."""
    reply, applied, _ = await send_and_wait(nc, command, timeout=timeout, wait=wait, wait_timeout=wait_timeout)
    return reply, applied


def typed(command: Command) -> str:
    """The ``ctl`` action a command is sent by (``save`` for ``save_checkpoint``): what the user typed."""
    return TYPED.get(command.type, command.type)


@dataclass
class Waiting:
    """What ``--wait`` has seen of one command: its ``applied`` result and the events it may have produced."""

    command: Command
    applied: CommandResult | None = None
    seen: list[Event] = field(default_factory=list)

    def take(self, event: Event | None) -> None:
        """One event of the run, in stream order; raises ``Rejected`` when the run ended before applying it."""
        if isinstance(event, Evaluation | Checkpoint):
            self.seen.append(event)
        elif isinstance(event, CommandResult) and event.command_id == self.command.command_id:
            if event.status == "rejected":  # accepted, then the run ended before applying it
                raise Rejected(f"{typed(self.command)} was accepted but not applied ({event.code}): {event.message}")
            if event.status == "applied":
                self.applied = event

    @property
    def produced(self) -> Evaluation | Checkpoint | None:
        return _produced(self.seen, self.command, self.applied.step) if self.applied is not None else None

    @property
    def done(self) -> bool:
        """Applied, and what it makes (an evaluation, a checkpoint) is here or was there already."""
        if self.applied is None:
            return False
        return self.command.type not in PRODUCES or already_saved(self.applied) or self.produced is not None

    def timed_out(self, wait_timeout: float) -> TrainbusError:
        if self.applied is None:
            return TrainbusError(f"{typed(self.command)} was accepted but not applied within {wait_timeout:g}s")
        what = "evaluation" if self.command.type == "evaluate" else "checkpoint"
        return TrainbusError(
            f"{typed(self.command)} was applied at step {self.applied.step}, but no {what} came within {wait_timeout:g}s"
        )


def already_saved(applied: CommandResult) -> bool:
    """A ``save`` at a step saved already: the result names that checkpoint, none is written again."""
    return bool(applied.applied.get("already_saved"))


async def send_and_wait(
    nc: NATS, command: Command, *, timeout: float = 5.0, wait: bool = False, wait_timeout: float = 60.0
) -> tuple[CommandReply, CommandResult | None, Evaluation | Checkpoint | None]:
    """``send_command``, and with ``wait`` for ``evaluate``/``save_checkpoint`` also the ``eval`` or
    ``checkpoint`` event the command produced."""
    # one subscription to the run's events keeps their order: a save made while paused comes before its result
    results = await nc.subscribe(run_events(command.run_id)) if wait else None
    try:
        reply = await _request(nc, command, timeout)
        if reply.status == "rejected" or results is None:
            return reply, None, None
        waiting = Waiting(command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_timeout
        while not waiting.done and (left := deadline - loop.time()) > 0:
            try:
                waiting.take(_readable((await results.next_msg(timeout=left)).data))
            except (TimeoutError, nats.errors.TimeoutError):
                break
        if not waiting.done:
            raise waiting.timed_out(wait_timeout)
        return reply, waiting.applied, waiting.produced
    finally:
        if results is not None:
            await results.unsubscribe()


async def _request(nc: NATS, command: Command, timeout: float) -> CommandReply:
    """The trainer's answer; ``NoTrainer`` (``RunEnded`` when the stream says the run is over) without one."""
    subject = control_subject(command.run_id)
    try:
        msg = await nc.request(subject, command.model_dump_json().encode(), timeout=timeout)
    except nats.errors.NoRespondersError:
        why = f"no trainer is listening for run {command.run_id!r} (nobody subscribes to {subject})"
    except (TimeoutError, nats.errors.TimeoutError):
        why = f"no trainer answered on {subject} within {timeout:g}s"
    else:
        return CommandReply.model_validate_json(msg.data)
    ended = await run_ended(nc, command.run_id)
    if ended is not None:
        raise RunEnded(
            f"run {command.run_id} {ended.status} at step {ended.step}: {typed(command)} has no trainer to act on"
        )
    raise NoTrainer(why)


async def run_ended(nc: NATS, run_id: str) -> RunFinished | None:
    """The run's ``run.finished`` when its latest attempt has one, else None (also when the stream cannot say)."""
    try:
        js = nc.jetstream()
        finished = await last_event(js, event_subject(run_id, "run.finished"))
        started = await last_event(js, event_subject(run_id, "run.started"))
    except (nats.errors.Error, TimeoutError):
        return None
    if finished is None or not isinstance(finished.event, RunFinished):
        return None
    if started is not None and started.event is not None and started.event.attempt > finished.event.attempt:
        return None  # a later attempt started: its trainer should answer
    return finished.event


def register_ctl(sub: Any) -> None:
    p = sub.add_parser("ctl", help="send a control command to a running trainer (pause, resume, stop, save, eval, set)")
    p.add_argument("action", choices=sorted(ACTIONS), help="what to do")
    p.add_argument("values", nargs="*", metavar="KEY=VALUE", help="for set: learning_rate=1e-5 max_grad_norm=0.5 …")
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--wait", action="store_true", help="wait until the trainer has applied it")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the trainer's answer")
    p.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for 'applied' with --wait")
    p.add_argument("--reason", default="", help="why (recorded in the event stream)")
    p.add_argument("--as", dest="issued_by", help="who issues it (default: the NATS user, else the OS user)")
    p.add_argument("--no-save", action="store_true", help="for stop: do not save a checkpoint first")
    add_settings_args(p)
    p.set_defaults(func=cmd_ctl)


def cmd_ctl(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    command = _command(args)
    denied: list[str] = []
    with bus_target(settings) as target:

        async def go() -> tuple[CommandReply, CommandResult | None, Evaluation | Checkpoint | None]:
            # the permission error is ours to say, in one line: the connection's warning would repeat it
            nc = await connect(
                target, settings, name="trainbus-ctl", on_permission_error=denied.append, log=_Quiet(get_logger())
            )
            try:
                return await send_and_wait(
                    nc, command, timeout=args.timeout, wait=args.wait, wait_timeout=args.wait_timeout
                )
            except NoTrainer:
                if denied:
                    raise BusUnavailable(
                        f"the server denied user {default_issuer()!r} publishing to {control_subject(command.run_id)} "
                        "(a viewer may not send commands; use an operator's credentials)"
                    ) from None
                raise
            finally:
                await nc.close()

        reply, applied, produced = asyncio.run(go())
    for line in report(command, reply, applied, produced):
        print(line)
    return 0


def _command(args: argparse.Namespace) -> Command:
    """The command ``trainbus ctl`` was asked to send; a mistake is a ``ConfigError`` naming it."""
    try:
        run_id = check_run_id(args.run)
    except ValueError as exc:
        raise ConfigError(f"--run: {exc}") from None
    if args.values and args.action != "set":
        raise ConfigError(f"{args.action} takes no KEY=VALUE arguments")
    if args.action == "set" and not args.values:
        raise ConfigError("set needs at least one KEY=VALUE, e.g. learning_rate=1e-5")
    return build_command(
        args.action,
        run_id,
        issued_by=args.issued_by or default_issuer(),
        reason=args.reason,
        settings=args.values,
        save=not args.no_save,
    )


def report(
    command: Command, reply: CommandReply, applied: CommandResult | None, produced: Evaluation | Checkpoint | None
) -> list[str]:
    """What ``trainbus ctl`` prints, naming the action as the user typed it; raises ``Rejected``."""
    action = typed(command)
    if reply.status == "rejected":
        raise Rejected(f"{action} rejected ({reply.code}): {reply.message}")
    if applied is None:
        return [
            f"{action} accepted at step {reply.step} (command {command.command_id}); it applies at the next step boundary"
        ]
    if already_saved(applied):
        sha = str(applied.applied.get("sha256", ""))
        return [
            f"{action} applied at step {applied.step} (command {command.command_id})",
            f"checkpoint at step {applied.step} was saved already: {applied.applied.get('checkpoint')} "
            f"(sha256 {sha[:12]}…); it is not written again",
        ]
    extra = f" {json.dumps(applied.applied)}" if applied.applied else ""
    lines = [f"{action} applied at step {applied.step} (command {command.command_id}){extra}"]
    if isinstance(produced, Evaluation):
        lines.append(f"evaluation at step {produced.step}: {summary(produced)}")
    elif isinstance(produced, Checkpoint):
        lines.append(
            f"checkpoint at step {produced.step}: {produced.path} "
            f"(sha256 {produced.sha256[:12]}…, {produced.size_bytes} bytes)"
        )
    return lines


class _Quiet:
    """A logger that drops the connection's permission warning (``cmd_ctl`` says it in its one line)."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def warning(self, event: str, **fields: Any) -> None:
        if event != "nats permission violation":
            self._log.warning(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)
