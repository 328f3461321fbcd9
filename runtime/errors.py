"""One exception root for the project; the CLI turns these into one line and an exit code."""

from __future__ import annotations


class TrainbusError(Exception):
    """A failure the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(TrainbusError):
    """Bad input: a config file, a ``--set`` override, a run id, a command argument."""

    exit_code = 2


class BusUnavailable(TrainbusError):
    """The NATS server cannot be reached or refused our credentials."""

    exit_code = 3


class NotFound(TrainbusError):
    """A run, checkpoint or file that was asked for does not exist."""

    exit_code = 2
