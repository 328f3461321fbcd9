"""Provisioning TRAINBUS_EVENTS is idempotent: same limits change nothing, new limits update it,
a change the server refuses is explained and the existing stream kept."""

from __future__ import annotations

from pathlib import Path

from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.settings import ServerSettings, Settings, StreamSettings
from schemas import EVENTS_STREAM


async def test_second_start_updates_or_explains(tmp_path: Path) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    try:
        settings = Settings()
        nc = await connect(BusTarget([server.url], "test"), settings, name="test")
        js = nc.jetstream()
        assert await ensure_stream(js, StreamSettings()) == "created"
        assert await ensure_stream(js, StreamSettings()) == "unchanged"
        assert await ensure_stream(js, StreamSettings(max_age_days=7, max_bytes=1 << 28)) == "updated"
        info = await js.stream_info(EVENTS_STREAM)
        assert info.config.max_bytes == 1 << 28 and round(info.config.max_age or 0) == 7 * 86400
        assert info.config.duplicate_window is not None and info.config.duplicate_window >= 600
        # replicas > 1 cannot be had on a single server: kept, explained, not a crash
        assert await ensure_stream(js, StreamSettings(max_age_days=7, max_bytes=1 << 28, replicas=3)) == "kept"
        assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 1
        await nc.close()
    finally:
        server.stop()
