"""Serve and export load a checkpoint without third-party noise, and say so in one line of their own.

Loading a trainbus checkpoint makes the libraries talk about things that are expected for this
model shape and that nobody can act on: a ``Loading weights`` progress bar, peft's warning that
a tied embedding is part of the adapter, peft's note that merging unties the embeddings (serving
merges on purpose), and transformers' deprecation of ``is_gradient_checkpointing``, which peft
still calls. ``quiet_loading`` silences exactly those; any other warning is still shown.
"""

from __future__ import annotations

import sys
import warnings

from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as hf_logging

from consumers.predict.checkpoints import Chosen

EXPECTED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # the model ties its input and output embeddings and the adapter trains them: true of every tiny run
    (UserWarning, r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"),
    # serving merges the adapter into the base weights, which unties them: that is what serving wants
    (UserWarning, r"Input and output embeddings are no longer tied after merging"),
    # transformers 5 renamed the property; peft, not trainbus, reads the old name
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


def quiet_loading() -> None:
    """No progress bars from transformers and the hub, and none of ``EXPECTED_WARNINGS``, in this process."""
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def say_loading(command: str, chosen: Chosen) -> None:
    """On a terminal, the one line that stands where the libraries' bars and warnings were."""
    if sys.stdout.isatty():
        print(f"trainbus {command}: loading run {chosen.run_id} step {chosen.step} from {chosen.path} …", flush=True)
