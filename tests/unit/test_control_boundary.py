"""A command is applied at the first step boundary after the one its ``accepted`` reply names,
even when the publisher process decides on it in another process at the very moment the trainer reaches a
boundary (the race `trainbus bench control` once caught: 199 of 200 at the first boundary)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

from producers.run.control_inbox import ControlChannel, PipeLink
from runtime.publish.journal import Journal
from schemas import SaveCheckpoint

RUN = "boundary-run"
COMMANDS = 400


def _publisher_process(journal_path: str, write_fd: int, replies_path: str) -> None:
    """The publisher process's half: accept commands at random moments, note the step each reply names."""
    channel = ControlChannel(RUN, link=PipeLink(Journal(Path(journal_path)), write_fd=write_fd))
    rng = random.Random(7)
    with open(replies_path, "w") as out:
        for i in range(COMMANDS):
            reply = channel.submit(SaveCheckpoint(command_id=f"c{i}", run_id=RUN, issued_by="test"))
            assert reply.status == "accepted", reply
            out.write(json.dumps([reply.command_id, reply.step]) + "\n")
            out.flush()
            time.sleep(rng.random() * 0.002)


def test_a_command_is_taken_at_the_first_boundary_after_the_one_its_reply_names(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl", fresh=True)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    trainer = ControlChannel(RUN, link=PipeLink(journal, read_fd=read_fd))
    replies = tmp_path / "replies.jsonl"
    publisher = multiprocessing.get_context("fork").Process(
        target=_publisher_process, args=(str(journal.path), write_fd, str(replies))
    )
    publisher.start()
    taken_at: dict[str, int] = {}
    step = 0
    deadline = time.monotonic() + 120
    while len(taken_at) < COMMANDS and time.monotonic() < deadline:
        step += 1
        for command in trainer.arrive(step):
            taken_at[command.command_id] = step
        for _ in range(200):  # a short "training step" between boundaries
            pass
    publisher.join(60)
    assert publisher.exitcode == 0
    assert len(taken_at) == COMMANDS
    named = {cid: s for cid, s in map(json.loads, replies.read_text().splitlines())}
    late = {cid: (named[cid], taken_at[cid]) for cid in named if taken_at[cid] > named[cid] + 1}
    assert not late, (
        f"{len(late)} commands taken after the first boundary following their reply: {list(late.items())[:5]}"
    )
