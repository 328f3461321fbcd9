"""The Try-it page's calls to the predictor (`trainbus serve`), run on the bus reader's loop.

``discover`` asks every predictor which alias it serves (``$SRV.INFO``); ``ask`` sends one text
to an alias. Both go through ``BusReader.submit`` with ``consumers.predict.client`` — the code
`trainbus predict` uses — and return a future the page polls, so the script thread never waits
on the network and no session opens a connection of its own. ``Reply`` turns whatever the
future ends with into what the page says: the answer, or one line on why there is none.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from consumers.predict.client import SERVICE_NAME, NoService, PredictFailed, ServedAlias, predict, served_aliases
from dashboards.app.denials import Denied
from dashboards.app.reader import BusReader
from runtime.errors import TrainbusError
from schemas.predict import Answer, MetadataValue
from schemas.subjects import predict_subject

DISCOVERY_SECONDS = 5.0
"""How often an open Try-it page asks again which aliases are served."""
DISCOVERY_WAIT = 1.0
"""How long one discovery collects the predictors' ``$SRV.INFO`` answers."""
PREDICT_TIMEOUT = 30.0
"""Seconds to wait for an answer (a rationale is generated token by token on a CPU)."""
HOW_TO_SERVE = "Start one with `trainbus serve --run RUN` (it serves the run's best approved checkpoint as alias RUN)."


@dataclass(frozen=True)
class Discovery:
    """One round of asking which aliases are served."""

    started: float
    """``time.monotonic()`` when it was sent."""
    future: concurrent.futures.Future[list[ServedAlias]]

    def stale(self, now: float) -> bool:
        return self.future.done() and now - self.started >= DISCOVERY_SECONDS


def discover(reader: BusReader) -> Discovery:
    """Ask every predictor on the bus what it serves; the future holds the aliases, sorted."""
    future = reader.submit(lambda nc: served_aliases(nc, wait=DISCOVERY_WAIT), publishes=[f"$SRV.INFO.{SERVICE_NAME}"])
    return Discovery(time.monotonic(), future)


@dataclass
class Discoveries:
    """One session's discoveries: the one shown, and the next while it is out (so the picker
    keeps what the last round found instead of blinking back to "looking")."""

    shown: Discovery | None = None
    pending: Discovery | None = None

    def current(self, start: Callable[[], Discovery], now: float) -> Discovery:
        """The discovery to show; starts the first one, and the next when the shown one is stale."""
        if self.pending is not None and self.pending.future.done():
            self.shown, self.pending = self.pending, None
        if self.shown is None:
            self.shown = start()
        elif self.pending is None and self.shown.stale(now):
            self.pending = start()
        return self.shown


def aliases_of(discovery: Discovery | None) -> tuple[list[ServedAlias] | None, str]:
    """(the aliases found, "") once a discovery is done; (None, why) when it failed; (None, "") before."""
    if discovery is None or not discovery.future.done():
        return None, ""
    try:
        return discovery.future.result(), ""
    except Denied as exc:
        return None, f"The server does not let {exc.user} look for predictors: {exc.detail}."
    except TrainbusError as exc:
        return None, f"Could not look for predictors: {exc}."


@dataclass(frozen=True)
class Asked:
    """A text this session sent to an alias (with the metadata picked, if any), and the future of the answer."""

    alias: str
    text: str
    rationale: bool
    future: concurrent.futures.Future[list[Answer]]
    metadata: dict[str, str] = field(default_factory=dict)


def ask(reader: BusReader, alias: str, text: str, *, rationale: bool, metadata: dict[str, str] | None = None) -> Asked:
    """Send ``text`` to the predictor serving ``alias``, with ``metadata`` as `trainbus predict --metadata` sends it."""
    picked: dict[str, MetadataValue] = dict(metadata or {})
    future = reader.submit(
        lambda nc: predict(nc, alias, [text], metadata=picked, rationale=rationale, timeout=PREDICT_TIMEOUT),
        publishes=[predict_subject(alias)],
    )
    return Asked(alias, text, rationale, future, dict(metadata or {}))


@dataclass(frozen=True)
class Reply:
    """What the page shows for an ``Asked``: the answer, or ``kind`` and one line on why not."""

    answer: Answer | None = None
    kind: str = ""
    """``no_service``, ``refused`` (the predictor's error reply), ``denied`` (the user's role) or ``error``."""
    message: str = ""


def reply_of(asked: Asked) -> Reply | None:
    """The reply once the future is done; None while the question is out."""
    if not asked.future.done():
        return None
    try:
        return Reply(answer=asked.future.result()[0])
    except PredictFailed as exc:
        return Reply(kind="refused", message=f"{asked.alias} refused the text ({exc.code}): {exc.message}")
    except NoService as exc:
        return Reply(kind="no_service", message=f"{str(exc)[0].upper()}{str(exc)[1:]}. {HOW_TO_SERVE}")
    except Denied as exc:
        return Reply(
            kind="denied",
            message=f"Not allowed: the server denied {exc.user} calling {exc.subject} ({exc.detail}). "
            "Predictions need the viewer or operator role.",
        )
    except TrainbusError as exc:  # a request the client refuses to send (one line), a lost bus
        return Reply(kind="error", message=str(exc))
