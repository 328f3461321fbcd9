"""Launched by torchrun or accelerate launch in test_lifecycle.py: trains the tiny config and
records, on every rank, the optimizer's learning rate at each step boundary (after trainbus
applied commands)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.config import RunConfig
from producers.run.train import run
from runtime.settings import load_config


class Probe(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.out = open(path, "w")  # noqa: SIM115 - closed at train end

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        lr = kwargs["optimizer"].param_groups[0]["lr"]
        self.out.write(json.dumps({"step": state.global_step, "lr": lr, "time": time.time()}) + "\n")
        self.out.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.out.close()


if __name__ == "__main__":
    probe_dir, run_id, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(RunConfig, "configs/tiny.yaml", overrides)
    rank = int(os.environ.get("RANK", "0"))
    sys.exit(run(cfg, run_id=run_id, callbacks=[Probe(os.path.join(probe_dir, f"rank{rank}.jsonl"))]))
