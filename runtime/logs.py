"""structlog setup: JSON lines when stderr is not a terminal, readable console lines when it is.

On a terminal a command may also keep one status line at the bottom (``status``: the training
progress bar); log lines are printed above it and it is redrawn after them, so the two never mix.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEYS = ("password", "token", "creds", "nkey", "secret", "seed")


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if any(s in key.lower() for s in SECRET_KEYS):
            event_dict[key] = "***"
    return event_dict


class StatusLine:
    """One line redrawn in place on a terminal's stderr (nothing is drawn off a terminal)."""

    def __init__(self) -> None:
        self.text = ""

    def show(self, text: str) -> None:
        """Replace the status line with ``text`` (cut to the terminal's width)."""
        if not sys.stderr.isatty():
            return
        self.text = text[: max(10, shutil.get_terminal_size().columns - 1)]
        sys.stderr.write(f"\r{self.text}\033[K")
        sys.stderr.flush()

    def clear(self) -> None:
        """Remove the status line for good."""
        if self.text:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.text = ""

    def print_above(self, message: str) -> None:
        """Print a line above the status line, then redraw it."""
        if self.text and sys.stderr.isatty():
            sys.stderr.write(f"\r\033[K{message}\n{self.text}\033[K")
            sys.stderr.flush()
        else:
            print(message, file=sys.stderr, flush=True)


status = StatusLine()
"""This process's status line."""


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is now (pytest and notebooks swap it)."""

    def msg(self, message: str) -> None:
        status.print_above(message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def console_output(fmt: str = "auto") -> bool:
    """Whether this process writes for a person (a terminal) rather than for a machine (JSON lines)."""
    return fmt == "console" or (fmt == "auto" and sys.stderr.isatty())


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process; logs go to stderr, stdout stays for command output."""
    if console_output(fmt):
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
        renderer: Any = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    else:
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A structlog logger with ``context`` (e.g. ``run_id``) bound."""
    return structlog.get_logger("trainbus").bind(**context)
