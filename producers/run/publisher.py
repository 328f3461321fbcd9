"""``python -m producers.run.publisher``: a training run's publisher process, started by ``open_bus``.

It owns the run's NATS connection: it sends the journal the training process appends to
(``runtime.publish.process``) and answers ``trainbus.control.<run_id>`` with a ``ControlChannel`` whose accepted
commands go to the training process on a pipe (``PipeLink``) and whose replies are recorded as
``command.result`` events in the journal, numbered in the trainer's sequence. It reads its ``Spec``
from stdin; nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from producers.run.control_inbox import ControlChannel, PipeLink, result_fields
from producers.run.fencing import Fence, fence_stop, launched_by
from runtime.publish.journal import Journal
from runtime.publish.process import JournalSink, Listeners, Responders, Spec, serve
from runtime.publish.sinks import Stamper
from schemas import Command, CommandReply, CommandResult, control_subject


def main() -> int:
    spec = Spec.model_validate_json(sys.stdin.buffer.read())
    journal = Journal(Path(spec.journal))
    run_id = spec.run_id

    def responders(sink: JournalSink) -> Responders:
        if spec.commands_fd < 0:  # a publisher process without a control channel
            return {}
        stamper = Stamper(sink, run_id, attempt=None)  # the trainer's attempt, from the shared state

        def record(command: Command | None, reply: CommandReply) -> None:
            if journal.attempt:  # 0: the trainer's callback is not there yet, and nothing records replies
                stamper.emit(CommandResult, **result_fields(command, reply))

        channel = ControlChannel(run_id, record, PipeLink(journal, write_fd=spec.commands_fd))

        def handle(data: bytes) -> bytes:
            if sink.closing:  # the training process is gone or closing: nothing would apply it
                return channel.refuse(data, "finished", "the run's training process has ended")
            return channel.handle(data)

        channels.append(channel)
        return {control_subject(run_id): handle}

    def listeners(connected: Callable[[], bool]) -> Listeners:
        agent = launched_by(os.environ)
        if agent is None or not channels:  # started by hand: nobody else may start this run
            return {}
        stop = fence_stop(channels[0], run_id)
        return Fence(run_id, agent, lambda: journal.attempt, stop, connected).listeners()

    channels: list[ControlChannel] = []
    return serve(spec, journal, responders, listeners)


if __name__ == "__main__":
    sys.exit(main())
