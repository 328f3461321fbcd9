"""The app's handle on the shared bus reader, and what every page shows around its own content.

Streamlit runs page scripts again on every rerun and every session; the reader must outlive
them all, so ``reader()`` returns an ``st.cache_resource``: one ``BusReader`` per server process,
keyed by where the bus is and who connects. ``trainbus dashboard`` finds the bus like every
command and passes it on in ``NATS_URL``; run through ``streamlit run`` directly, the app also
finds the server `trainbus up` started in this folder.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from dashboards.app.reader import CONNECTING, BusReader, Overview
from runtime.bus.connect import BusTarget, Credentials
from runtime.bus.server import read_state
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import get_logger
from runtime.settings import Settings, load_config

F = TypeVar("F", bound=Callable[..., None])

LIVE_SECONDS = 0.5
"""How often the live parts of a page (run state, step, command outcomes, banner) refresh."""
CHART_SECONDS = 1.0
"""How often charts and tables refresh."""


def _bus_url(settings: Settings) -> str:
    url = settings.bus.url or os.environ.get("NATS_URL") or read_state(Path(settings.state_dir))
    if not url or url == "embedded":
        raise ConfigError("no bus to read: start the dashboard with `trainbus dashboard` (or set NATS_URL)")
    return url


@st.cache_resource(show_spinner=False, max_entries=4, on_release=lambda reader: reader.close())
def _shared_reader(url: str, user: str | None) -> BusReader:
    settings = load_config(Settings)
    servers = [s.strip() for s in url.split(",") if s.strip()]
    return BusReader(BusTarget(servers, "NATS_URL"), settings, credentials=Credentials.from_env()).start()


def reader() -> BusReader:
    """The process-wide reader; a bad bus setting is shown as one line and stops the page."""
    try:
        settings = load_config(Settings)
        url = _bus_url(settings)
        Credentials.from_env()  # a bad NATS_CREDS/NATS_NKEY path is a one-line error, not a traceback
    except TrainbusError as exc:
        st.error(f"trainbus dashboard: {exc}")
        st.stop()
    return _shared_reader(url, os.environ.get("NATS_USER") or None)


def banner(overview: Overview) -> None:
    """The bus banner (lost, waiting, replaying) and the invalid-event warning."""
    bus = overview.bus
    if not bus.connected and bus.detail == CONNECTING:
        st.info(f"Connecting to the bus at **{bus.url}**…", icon=":material/hourglass_top:")
    elif not bus.connected:
        since = time.strftime("%H:%M:%S", time.localtime(bus.since))
        st.error(
            f"No connection to the bus at **{bus.url}** since {since}; reconnecting by itself. ({bus.detail})",
            icon=":material/cloud_off:",
        )
    elif bus.detail:
        st.info(bus.detail, icon=":material/hourglass_top:")
    elif not bus.caught_up:
        st.info(
            f"Replaying the event stream from {bus.url}: {bus.replayed:,} events so far…", icon=":material/history:"
        )
    if overview.newer_events:
        st.info(
            f"{overview.newer_events} event{'s' if overview.newer_events != 1 else ''} written by a newer trainbus "
            "skipped: upgrade trainbus to read them.",
            icon=":material/upgrade:",
        )
    if overview.invalid_events:
        last = overview.invalid_recent[-1] if overview.invalid_recent else ""
        st.warning(
            f"{overview.invalid_events} invalid event{'s' if overview.invalid_events != 1 else ''} skipped (last: {last})",
            icon=":material/warning:",
        )


def guarded(draw: Callable[..., None], *args: Any) -> None:
    """Draw part of a page; an unexpected error becomes one line on the page (details in the log)."""
    try:
        draw(*args)
    except Exception as exc:  # Streamlit's stop/rerun/switch_page are BaseExceptions and pass through
        get_logger(component="dashboard").exception("page failed to draw", error=str(exc))
        st.error(f"This part of the page could not be drawn ({type(exc).__name__}: {exc}); the server log has details.")


def live(seconds: float | None) -> Callable[[F], F]:
    """``st.fragment(run_every=seconds)`` whose errors are ``guarded``: a part of a page that
    refreshes by itself (``None``: only when its own widgets are used)."""

    def wrap(draw: F) -> F:
        @functools.wraps(draw)
        def safe(*args: Any) -> None:
            guarded(draw, *args)

        return st.fragment(safe, run_every=seconds)  # type: ignore[return-value]

    return wrap


@live(LIVE_SECONDS)
def wait_for_run(reader: BusReader, run_id: str | None, message: str) -> None:
    """Shown while a page has nothing to draw yet: reloads it as soon as the run (any run when
    ``run_id`` is None) appears on the bus, so a page opened before a run starts comes alive."""
    found = reader.run(run_id) is not None if run_id else bool(reader.overview().runs)
    if found:
        st.rerun(scope="app")
    st.info(message)
