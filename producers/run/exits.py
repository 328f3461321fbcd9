"""Every way a user's own training script can end, turned into one call: the run's last words.

Hugging Face does not call ``on_train_end`` when ``trainer.train()`` raises, so a script with
``TrainbusCallback.attach`` would end without ``run.finished`` and with events still queued in
memory. ``ExitGuard`` calls one function once, whichever way the run ends first:

- an exception out of ``trainer.train()`` (``wrap_train``, done by ``TrainbusCallback.attach``);
- the interpreter exiting with the run still open (``atexit``; an uncaught exception is named);
- SIGTERM, when nothing else handles it: it becomes ``SystemExit(143)`` in the main thread, so
  one of the two paths above runs and the process still exits with 128 + 15.

``trainbus train`` handles all of these itself and does not use this module.
"""

from __future__ import annotations

import atexit
import functools
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

Ended = Callable[[str, str | None], None]
"""Called with (reason, error) when the run ends badly."""


def describe(exc: BaseException | None, signal_name: str | None = None) -> tuple[str, str | None]:
    """(reason, error) of ``run.finished`` for a run ended by ``exc`` (None: the interpreter just exited)."""
    if signal_name is not None:
        return f"received {signal_name}", None
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "KeyboardInterrupt"
    if exc is None or (isinstance(exc, SystemExit) and not exc.code):
        return "the process exited before training ended", None
    return "error", (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]


class ExitGuard:
    """Calls ``ended`` once if the process leaves while ``armed`` (see the module docstring)."""

    def __init__(self, ended: Ended) -> None:
        self.ended = ended
        self.signal_name: str | None = None
        self._previous: Any = None

    def arm(self) -> None:
        """Watch interpreter exit, and SIGTERM if its handler is still the default one."""
        atexit.register(self._at_exit)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def disarm(self) -> None:
        """The run ended: leave the process as it was."""
        atexit.unregister(self._at_exit)
        in_main = threading.current_thread() is threading.main_thread()
        if self._previous is not None and in_main and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def crashed(self, exc: BaseException) -> None:
        """``trainer.train()`` raised ``exc``."""
        self.ended(*describe(exc, self.signal_name))

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        raise SystemExit(128 + signum)

    def _at_exit(self) -> None:
        # set by the interpreter for an uncaught exception, before atexit handlers run
        self.ended(*describe(getattr(sys, "last_value", None), self.signal_name))


def wrap_train(trainer: Any, crashed: Callable[[BaseException], None]) -> None:
    """Make ``trainer.train`` call ``crashed`` with whatever it raises (then re-raise it)."""
    original = trainer.train

    @functools.wraps(original)
    def train(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            crashed(exc)
            raise

    trainer.train = train
