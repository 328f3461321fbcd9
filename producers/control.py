"""The trainer's side of the control channel: validate and answer at once, apply at a step boundary.

``ControlChannel.handle`` runs on the bus thread for every request on
``trainbus.control.<run_id>``: it parses the command with the schema, decides ``accepted`` or
``rejected`` (with a reason code) against the state the run will be in once queued commands
are applied, records the reply by ``command_id`` (a repeated id gets the same reply, is
applied once and recorded once), and puts the command in the queue the training thread drains
at each step boundary. Every first reply also goes into the event stream as a
``command.result``. When the run ends, ``close`` hands back the commands accepted but never
applied, so that each gets an outcome.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from schemas import Command, CommandReply, Stop, parse_command

_ALWAYS = {"save_checkpoint", "evaluate", "set", "stop"}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def _command_id(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    value = obj.get("command_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


class ControlChannel:
    """Commands of one run, shared by the bus thread (``handle``) and the training thread."""

    def __init__(self, run_id: str, on_reply: Callable[[Command | None, CommandReply], None] | None = None) -> None:
        self.run_id = run_id
        self.on_reply = on_reply
        self.step = 0
        self.state = "running"  # what the run will be once queued commands are applied
        self.finished = False
        self._queue: list[Command] = []
        self._replies: OrderedDict[str, CommandReply] = OrderedDict()
        self._cv = threading.Condition()

    def handle(self, data: bytes) -> bytes:
        """Answer one request (bus thread): the JSON of a ``CommandReply``."""
        command: Command | None = None
        try:
            command = parse_command(data)
        except ValidationError as exc:
            reply = CommandReply(
                command_id=_command_id(data), status="rejected", code="invalid", message=_first_error(exc)
            )
        else:
            reply, new = self._decide(command)
            if not new:  # a repeat (a client retrying): same answer, but it was recorded already
                return reply.model_dump_json().encode()
        if self.on_reply is not None:
            self.on_reply(command, reply)
        return reply.model_dump_json().encode()

    def _decide(self, command: Command) -> tuple[CommandReply, bool]:
        """The reply to ``command``, and whether it is new (False: the id was answered before)."""
        with self._cv:
            previous = self._replies.get(command.command_id)
            if previous is not None:
                return previous, False
            reply = self._check(command)
            self._replies[command.command_id] = reply
            while len(self._replies) > 10_000:
                self._replies.popitem(last=False)
            if reply.status == "accepted":
                self._queue.append(command)
                self.state = {"pause": "paused", "resume": "running", "stop": "stopping"}.get(command.type, self.state)
                self._cv.notify_all()
            return reply, True

    def _check(self, command: Command) -> CommandReply:
        def reject(code: Any, message: str) -> CommandReply:
            return CommandReply(
                command_id=command.command_id, status="rejected", code=code, message=message, step=self.step
            )

        if command.run_id != self.run_id:
            return reject("wrong_run", f"this trainer runs {self.run_id!r}, not {command.run_id!r}")
        if self.finished or self.state == "stopping":
            return reject("finished", f"the run is {'finished' if self.finished else 'stopping'}")
        if command.type == "pause" and self.state == "paused":
            return reject("not_applicable", "the run is already paused")
        if command.type == "resume" and self.state != "paused":
            return reject("not_applicable", "the run is not paused")
        if command.type not in _ALWAYS | {"pause", "resume"}:
            return reject("invalid", f"unknown command {command.type}")
        return CommandReply(command_id=command.command_id, status="accepted", step=self.step)

    def submit(self, command: Command) -> CommandReply:
        """Queue a command from inside the process (e.g. a SIGTERM becomes ``stop``)."""
        reply, new = self._decide(command)
        if new and self.on_reply is not None:
            self.on_reply(command, reply)
        return reply

    def take(self, timeout: float = 0.0) -> list[Command]:
        """Accepted commands not yet applied (training thread); waits up to ``timeout`` for one."""
        with self._cv:
            if not self._queue and timeout > 0:
                self._cv.wait(timeout)
            out, self._queue = self._queue, []
            return out

    def close(self) -> list[Command]:
        """The run ended: later commands are rejected as ``finished``; returns those accepted but never applied."""
        with self._cv:
            self.finished = True
            unapplied, self._queue = self._queue, []
            self._cv.notify_all()
            return unapplied


def internal_stop(run_id: str, reason: str, command_id: str) -> Stop:
    """A ``stop`` (with save) the trainer issues itself, e.g. on SIGTERM."""
    return Stop(command_id=command_id, run_id=run_id, issued_by="trainbus", reason=reason, save=True)
