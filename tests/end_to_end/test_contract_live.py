"""A client that knows only `trainbus schema export` steers a live trainer: each command built from
its schema's required fields alone is accepted or rejected for a reason, never called invalid."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from runtime.bus.server import RunningServer
from runtime.cli.main import main
from schemas import CommandReply, control_subject
from schemas.commands import COMMAND_TYPES
from tests.conftest import wait_until
from tests.end_to_end.conftest import of_type, start_trainer, wait_events
from tests.schema_client import required_payload

RUN = "contract-live"


def request(url: str, subject: str, payload: dict[str, Any]) -> CommandReply | None:
    """The trainer's reply, or None while nobody listens on ``subject`` yet."""

    async def go() -> CommandReply | None:
        nc = await nats.connect(url)
        try:
            msg = await nc.request(subject, json.dumps(payload).encode(), timeout=10)
        except nats.errors.NoRespondersError:
            return None
        finally:
            await nc.close()
        return CommandReply.model_validate_json(msg.data)

    return asyncio.run(go())


@pytest.mark.slow
def test_every_command_built_from_its_schema_alone_is_answered_with_a_reason(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    schemas = tmp_path / "schemas"
    assert main(["schema", "export", str(schemas)]) == 0
    # resume while running is rejected (not_applicable); pause first keeps the run alive for the rest
    order = ["resume", "pause", *sorted(set(COMMAND_TYPES) - {"resume", "pause", "stop"}), "stop"]
    assert set(order) == set(COMMAND_TYPES)
    payloads = {}
    for command_type in order:
        payload = required_payload(json.loads((schemas / f"command.{command_type}.json").read_text()))
        payloads[command_type] = {**payload, "run_id": RUN, "command_id": f"schema-client-{command_type}"}

    url = nats_server.url
    trainer = start_trainer(
        url, "configs/tiny.yaml", RUN, tmp_path,
        "training.max_steps=60", "training.eval_steps=null", "training.save_steps=null", "data.max_eval_samples=16",
    )  # fmt: skip
    try:
        subject = control_subject(RUN)
        replies = {"resume": wait_until(lambda: request(url, subject, payloads["resume"]), timeout=120,
                                        what="the trainer to answer on its control subject")}  # fmt: skip
        for command_type in order[1:]:
            replies[command_type] = request(url, subject, payloads[command_type])
        assert trainer.wait(120) == 0, trainer.output()[-2000:]
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()

    for command_type, reply in replies.items():
        assert reply is not None and reply.code != "invalid", (command_type, reply)
    resume = replies["resume"]
    assert resume is not None and (resume.status, resume.code) == ("rejected", "not_applicable") and resume.message
    assert all(r is not None and r.status == "accepted" for t, r in replies.items() if t != "resume"), replies
    events = wait_events(url, RUN, lambda ev: of_type(ev, "run.finished"))
    applied = {r.command for r in of_type(events, "command.result") if r.status == "applied"}
    assert applied == set(order) - {"resume"}
    assert of_type(events, "run.finished")[-1].status == "stopped"
