"""The bus dies for more than 10 s mid-run: training goes on and nothing is lost.

(How fast it goes meanwhile is a speed figure: ``trainbus bench overhead`` measures the bus's cost.)"""

from __future__ import annotations

import time
from pathlib import Path

from runtime.bus.server import start_server
from runtime.settings import ServerSettings
from tests.end_to_end.conftest import of_type, start_trainer, wait_events


def test_bus_outage_loses_nothing_and_training_goes_on(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = start_server(ServerSettings(), store, lock=False)
    port = int(server.url.rsplit(":", 1)[1])
    run = "outage-run"
    trainer = start_trainer(
        server.url, "configs/tiny.yaml", run, tmp_path,
        "training.max_steps=140", "training.logging_steps=1", "training.eval_steps=null", "training.save_steps=null",
        "publish.heartbeat_seconds=0.5", "bus.ack_timeout=1",
    )  # fmt: skip
    try:
        wait_events(server.url, run, lambda ev: len(of_type(ev, "train.step")) >= 20, timeout=120)
        server.stop()
        down_at = time.time()
        time.sleep(11)  # the outage itself: the trainer must keep going on its own
        assert trainer.process.poll() is None, "training stopped while the bus was down"
        server = start_server(ServerSettings(port=port), store, lock=False)
        up_at = time.time()
        assert trainer.wait(240) == 0, trainer.output()[-3000:]
        events = wait_events(server.url, run, lambda ev: of_type(ev, "run.finished"), timeout=60)
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()
        server.stop()
    trainer_events = [e for e in events if e.source == "trainer"]
    assert [e.seq for e in trainer_events] == list(range(1, len(trainer_events) + 1))  # once each, no gaps
    assert len({e.event_id for e in events}) == len(events)
    steps = of_type(trainer_events, "train.step")
    assert [s.step for s in steps] == list(range(1, 141))
    during = [s.step_time_seconds for s in steps if down_at + 1 < s.time.timestamp() < up_at]
    assert len(during) >= 20, "training made little progress while the bus was down"
    assert "still in" not in trainer.output()  # the outbox was drained after reconnect
