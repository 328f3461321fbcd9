"""The trainer: model/adapter building, data, the training loop and the bus callback.

``TrainbusCallback`` streams any Hugging Face ``Trainer`` run to the bus::

    from producers import TrainbusCallback
    TrainbusCallback.attach(trainer, run_id="my-run")
"""

from producers.callback import TrainbusCallback

__all__ = ["TrainbusCallback"]
