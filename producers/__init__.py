"""The trainer: model/adapter building, data, the training loop and the bus callback.

``TrainbusCallback`` streams any Hugging Face ``Trainer`` run to the bus::

    from producers import TrainbusCallback
    TrainbusCallback.attach(trainer, run_id="my-run")

It is imported lazily, so the ``trainbus`` CLI does not pay for torch unless it trains.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainbusCallback"]


def __getattr__(name: str) -> Any:
    if name == "TrainbusCallback":
        from producers.run.callback import TrainbusCallback

        return TrainbusCallback
    raise AttributeError(name)
