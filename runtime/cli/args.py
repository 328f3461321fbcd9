"""What the ``trainbus`` commands share: settings from ``--config``/``--set``, and argparse value types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from runtime.errors import ConfigError
from runtime.lifecycle import STALL_AFTER_SECONDS
from runtime.logs import setup_logging
from runtime.settings import Settings, load_config, packaged
from schemas import check_run_id

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_settings_args(
    p: argparse.ArgumentParser, config_help: str = "settings YAML (bus, stream, server, log)"
) -> None:
    """``--config`` and repeatable ``--set key=value`` on a subcommand."""
    p.add_argument("--config", metavar="YAML", type=packaged, help=config_help)
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override a setting, e.g. bus.url=nats://host:4222",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Load ``Settings`` from the command's ``--config``/``--set`` and set up logging."""
    settings = load_config(Settings, getattr(args, "config", None), getattr(args, "overrides", []))
    setup_logging(settings.log.level, settings.log.format)
    return settings


def run_id_arg(value: str) -> str:
    """argparse ``type=`` for a run id: a bad one is a usage error naming the rule."""
    try:
        return check_run_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_arg(value: str) -> float:
    """argparse ``type=`` for a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def add_stall_after_arg(p: argparse.ArgumentParser) -> None:
    """``--stall-after SECONDS``: when a live run whose trainer went silent is shown as stalled."""
    p.add_argument(
        "--stall-after",
        type=seconds_arg,
        default=STALL_AFTER_SECONDS,
        metavar="SECONDS",
        help=f"show a live run as stalled after this long without a trainer event (default {STALL_AFTER_SECONDS:.0f})",
    )


def since_arg(value: str) -> datetime:
    """argparse ``type=``: ``30s``, ``10m``, ``2h``, ``1d`` ago, or an ISO time (UTC unless it says)."""
    number, unit = value[:-1], value[-1:]
    if unit in UNITS and number.replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(number) * UNITS[unit])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: use 30s, 10m, 2h, 1d or an ISO time like 2026-05-01T12:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def choices_arg(known: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """argparse ``type=`` for a comma-separated list of ``known`` values."""

    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in known]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or repr(value)}: unknown {what} (known: {', '.join(known)})"
            )
        return items

    return parse


def add_cluster_arg(p: argparse.ArgumentParser) -> None:
    """``--cluster N``: N JetStream nodes on loopback instead of one server."""
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run a local JetStream cluster of N nodes (at least 3) instead of one server",
    )


def key_values(items: list[str], flag: str, example: str) -> dict[str, str]:
    """``KEY=VALUE`` items of a repeatable flag as a dict; a malformed one names the flag."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        pairs[key] = value
    return pairs
