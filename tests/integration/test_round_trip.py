"""``round_trip``: a subscription is at the server before anyone is told it is there.

nats-py's ``flush()`` writes its PING ahead of a SUB still queued for its flusher task, so a flush
alone can return before the server has the subscription; another connection publishing then is
lost (a control command sent the moment a run says it is up, a test's listener that hears
nothing)."""

from __future__ import annotations

from collections.abc import Iterable

from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, connect, round_trip
from runtime.bus.server import RunningServer
from runtime.settings import BusSettings, Settings

TIMEOUT = 20.0


async def _wired(server: RunningServer) -> tuple[NATS, list[bytes]]:
    """A connection whose socket writes are recorded, one command per entry."""
    nc = await connect(BusTarget([server.url], "test"), Settings(bus=BusSettings(url=server.url)), name="test-wire")
    wire: list[bytes] = []
    transport = nc._transport
    assert transport is not None
    write, writelines = transport.write, transport.writelines

    def record(data: bytes) -> None:
        wire.extend(line.split(b" ")[0] for line in bytes(data).split(b"\r\n") if line)

    def recorded_write(data: bytes) -> None:
        record(data)
        write(data)

    def recorded_writelines(chunks: Iterable[bytes]) -> None:
        chunks = list(chunks)
        for chunk in chunks:
            record(chunk)
        writelines(chunks)

    transport.write = recorded_write  # type: ignore[method-assign,assignment]
    transport.writelines = recorded_writelines  # type: ignore[method-assign,assignment]
    return nc, wire


async def test_a_subscription_is_at_the_server_when_round_trip_returns_and_hears_another_connection(
    nats_server: RunningServer,
) -> None:
    listener, wire = await _wired(nats_server)
    talker = await connect(BusTarget([nats_server.url], "test"), Settings(bus=BusSettings(url=nats_server.url)), name="test-talker")  # fmt: skip
    try:
        sub = await listener.subscribe("trainbus.test.round-trip")
        await round_trip(listener)
        # the last PING went out after the SUB: its PONG means the server has the subscription
        assert "SUB" in [w.decode() for w in wire], wire
        assert max(i for i, w in enumerate(wire) if w == b"SUB") < max(i for i, w in enumerate(wire) if w == b"PING"), wire  # fmt: skip
        await talker.publish("trainbus.test.round-trip", b"heard")
        await round_trip(talker)
        assert (await sub.next_msg(timeout=TIMEOUT)).data == b"heard"
    finally:
        await listener.close()
        await talker.close()
