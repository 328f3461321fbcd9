"""Finding and connecting to the bus.

Where the bus is, in this order: ``bus.url`` (``--set bus.url=…``) or ``NATS_URL``; else the
folder's bus: the server (or cluster) ``trainbus up`` started in this folder, or the embedded
server another command started here (``<state_dir>/bus.json``); else an embedded server for this
command's lifetime, recorded the same way so a second shell finds it. A target found in the
folder can be looked up again (``BusTarget.moved``): when ``up`` restarts on another port, a
long-lived client follows it. Credentials come from the NATS ecosystem's variables and are
never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from runtime.bus.server import RunningServer, StoreInUse, read_state, start_server
from runtime.errors import BusUnavailable, ConfigError
from runtime.logs import get_logger
from runtime.settings import Settings, redact_url

EMBEDDED = "embedded"
LOCAL = "this folder's bus"


@dataclass(frozen=True)
class Credentials:
    """How to authenticate, from NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or NATS_NKEY."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ
        creds = cls(
            user=env.get("NATS_USER") or None,
            password=env.get("NATS_PASSWORD") or None,
            token=env.get("NATS_TOKEN") or None,
            creds_file=env.get("NATS_CREDS") or None,
            nkey_seed_file=env.get("NATS_NKEY") or None,
        )
        for var, path in (("NATS_CREDS", creds.creds_file), ("NATS_NKEY", creds.nkey_seed_file)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{var}: {path} is not a readable file")
        if creds.password and not creds.user:
            raise ConfigError("NATS_PASSWORD is set but NATS_USER is not")
        return creds

    def connect_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token:
            opts["token"] = self.token
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            opts["nkeys_seed"] = self.nkey_seed_file
        return opts

    def identity(self) -> str | None:
        """The NATS user name we authenticate as, when there is one."""
        return self.user


@dataclass
class BusTarget:
    """Where to connect, how we found it, and the server we started (if any)."""

    servers: list[str]
    origin: str
    server: RunningServer | None = None
    state_dir: Path | None = None
    """The folder whose ``bus.json`` named this target (origin ``LOCAL``): ``moved`` reads it again."""

    @property
    def display(self) -> str:
        return ",".join(redact_url(s) for s in self.servers)

    def moved(self) -> BusTarget | None:
        """The folder's bus, when it now listens elsewhere than this target; None otherwise (or when
        the target was not found in a folder: a URL given by the user is never second-guessed)."""
        if self.origin != LOCAL or self.state_dir is None:
            return None
        url = read_state(self.state_dir)
        if url is None:
            return None
        servers = split_urls(url)
        return None if servers == self.servers else BusTarget(servers, LOCAL, state_dir=self.state_dir)


def split_urls(url: str) -> list[str]:
    """``nats://a:4222, nats://b:4222`` → the server URLs."""
    return [s.strip() for s in url.split(",") if s.strip()]


def resolve_target(
    settings: Settings, environ: Mapping[str, str] | None = None, *, announce: bool = True, start: bool = True
) -> BusTarget:
    """Find the bus (see module docstring). Starts an embedded server when there is none, unless
    ``start`` is False: then no bus is ``BusUnavailable``."""
    env = os.environ if environ is None else environ
    state_dir = Path(settings.state_dir)
    url = settings.bus.url or env.get("NATS_URL") or None
    origin = "bus.url" if settings.bus.url else "NATS_URL"
    if url and url != EMBEDDED:
        servers = split_urls(url)
        if not servers:
            raise ConfigError(f"{origin}: no server URL in {url!r}")
        return BusTarget(servers=servers, origin=origin)
    local = read_state(state_dir)
    if local:
        return BusTarget(servers=split_urls(local), origin=LOCAL, state_dir=state_dir)
    if not start:
        raise BusUnavailable("no bus: NATS_URL is not set and no `trainbus up` runs in this folder")
    try:
        server = start_server(settings.server, state_dir / "nats")
    except StoreInUse:
        # another command is starting this folder's server right now: use it once it has said where
        found = _await_state(state_dir, settings.bus.connect_timeout)
        if found is None:
            raise
        return BusTarget(servers=split_urls(found), origin=LOCAL, state_dir=state_dir)
    server.advertise(state_dir)
    if announce:
        print(
            f"trainbus: no bus configured; started an embedded nats-server at {server.url} for this command",
            file=sys.stderr,
            flush=True,
        )
    return BusTarget(servers=[server.url], origin=EMBEDDED, server=server)


def _await_state(state_dir: Path, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        url = read_state(state_dir)
        if url is not None or time.monotonic() > deadline:
            return url
        time.sleep(0.1)


@contextmanager
def bus_target(settings: Settings, *, announce: bool = True) -> Iterator[BusTarget]:
    """``resolve_target`` that stops an embedded server it started on exit."""
    target = resolve_target(settings, announce=announce)
    try:
        yield target
    finally:
        if target.server is not None:
            target.server.stop()


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "no answer"
    return str(err).strip().strip("'\"") or type(err).__name__


class _Watch:
    """The callbacks of one connection: errors before it is up are kept for the message, after it they are logged."""

    def __init__(self, target: BusTarget, creds: Credentials, log: Any, on_permission_error: Callable[[str], None] | None) -> None:  # fmt: skip
        self.target, self.creds, self.log, self.on_permission_error = target, creds, log, on_permission_error
        self.nc = NATS()
        self.errors: list[BaseException] = []
        self.connected = False
        self.auth_failed = asyncio.Event()

    async def on_error(self, err: Exception) -> None:
        text = str(err)
        if not self.connected:
            self.errors.append(err)
            if "authorization" in text.lower():
                self.auth_failed.set()  # retrying the same credentials will not help
        elif "permissions violation" in text.lower():
            self.log.warning("nats permission violation", detail=text.strip("'\" "), user=self.creds.identity())
            if self.on_permission_error is not None:
                self.on_permission_error(text)
        else:
            self.log.warning("nats error", error=text or type(err).__name__)

    async def on_disconnect(self) -> None:
        if self.connected and not (self.nc.is_closed or self.nc.is_draining):
            self.log.warning("bus disconnected", servers=self.target.display)

    async def on_reconnect(self) -> None:
        url = self.nc.connected_url.geturl() if self.nc.connected_url else self.target.display
        self.log.info("bus reconnected", server=redact_url(url))

    def unreachable(self, failure: BaseException) -> BusUnavailable:
        """What to tell the user when the first connection failed with ``failure``."""
        if any("authorization" in str(e).lower() for e in self.errors):  # the bus is there: it said no to who we are
            who = f"user {self.creds.user!r}" if self.creds.user else "these credentials"
            return BusUnavailable(
                f"authorization refused by the bus at {self.target.display} ({self.target.origin}) for {who}: wrong user, "
                "password or token; check NATS_USER/NATS_PASSWORD (or NATS_TOKEN, NATS_CREDS)"
            )
        err = self.errors[-1] if self.errors else failure
        return BusUnavailable(
            f"cannot reach the bus at {self.target.display} ({self.target.origin}): {_describe(err)}; "
            "start one with `trainbus up` or set NATS_URL"
        )


def _failure(attempt: asyncio.Future[None]) -> BaseException | None:
    """Why the connection ``attempt`` did not succeed, or None when it did."""
    if not attempt.done():
        attempt.cancel()
        return TimeoutError("no answer")
    if attempt.cancelled():
        return TimeoutError("cancelled")
    return attempt.exception()


async def connect(
    target: BusTarget,
    settings: Settings,
    *,
    name: str,
    credentials: Credentials | None = None,
    log: Any = None,
    on_permission_error: Callable[[str], None] | None = None,
) -> NATS:
    """Connect with reconnect-forever; the first connection must succeed within ``connect_timeout``."""
    creds = credentials if credentials is not None else Credentials.from_env()
    watch = _Watch(target, creds, log or get_logger(), on_permission_error)
    nc = watch.nc
    attempt = asyncio.ensure_future(
        nc.connect(
            servers=target.servers,
            name=name,
            error_cb=watch.on_error,
            disconnected_cb=watch.on_disconnect,
            reconnected_cb=watch.on_reconnect,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py accepts float seconds
            connect_timeout=max(1, int(settings.bus.connect_timeout)),
            **creds.connect_options(),
        )
    )
    denied = asyncio.ensure_future(watch.auth_failed.wait())
    await asyncio.wait({attempt, denied}, timeout=settings.bus.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    denied.cancel()
    failure = _failure(attempt)
    if failure is not None:
        with contextlib.suppress(BaseException):
            await attempt
        with contextlib.suppress(Exception):
            await nc.close()
        raise watch.unreachable(failure)
    watch.connected = True
    return nc


async def round_trip(nc: NATS) -> None:
    """Return once the server has processed everything ``nc`` sent so far, e.g. a subscription that
    another connection is about to publish to.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still queued
    for its flusher task: right after ``subscribe()`` the wire reads ``PING``, then ``SUB``, so one
    flush can return before the server has the subscription. The flusher runs before the first PONG
    can be read, so the second PING follows the SUB."""
    await nc.flush()
    await nc.flush()


@asynccontextmanager
async def connected(target: BusTarget, settings: Settings, *, name: str) -> AsyncIterator[NATS]:
    """``connect`` as an async context manager that drains the connection on exit, or closes it when
    the body failed (e.g. the reader of stdout went away): a drain would then wait on subscriptions
    nobody reads any more."""
    nc = await connect(target, settings, name=name)
    try:
        yield nc
    except BaseException:
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), 5)


def responder(handler: Callable[[bytes], bytes], log: Any) -> Callable[[Any], Awaitable[None]]:
    """A request/reply subscription callback: answer at once with ``handler``'s bytes."""

    async def respond(msg: Any) -> None:
        try:
            answer = handler(msg.data)
        except Exception as exc:  # a handler bug must not kill the bus thread
            log.error("request handler failed", subject=msg.subject, error=repr(exc))
            return
        if msg.reply:
            await msg.respond(answer)

    return respond


def issuer() -> str:
    """Who is acting: the NATS user we connect as, else the OS user."""
    return os.environ.get("NATS_USER") or getpass.getuser()


def listener(handler: Callable[[bytes], None], log: Any) -> Callable[[Any], Awaitable[None]]:
    """A subscription callback that only reads: it never replies (a JetStream-published message
    carries the publisher's ack inbox as its reply subject)."""

    async def hear(msg: Any) -> None:
        try:
            handler(msg.data)
        except Exception as exc:  # a handler bug must not kill the connection's loop
            log.error("listener failed", subject=msg.subject, error=repr(exc))

    return hear
