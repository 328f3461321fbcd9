"""Someone's own Hugging Face script with trainbus added; test_callback_faults runs it to see how it ends.

python user_script.py crash RUN_ID OUT   # Trainer(callbacks=[TrainbusCallback(...)]), raises at step 150
python user_script.py wait RUN_ID OUT    # TrainbusCallback.attach, trains until it is killed (SIGTERM)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from producers import TrainbusCallback


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class FailAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError(f"the user's code failed at step {self.step}")


if __name__ == "__main__":
    mode, run_id, out = sys.argv[1:4]
    torch.set_num_threads(1)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    args = TrainingArguments(
        output_dir=out, max_steps=100_000, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    if mode == "crash":
        trainer = Trainer(
            model=model, args=args, train_dataset=RandomTokens(),
            callbacks=[TrainbusCallback(run_id=run_id, heartbeat_seconds=0.05), FailAt(150)],
        )  # fmt: skip
    else:
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
        TrainbusCallback.attach(trainer, run_id=run_id, heartbeat_seconds=0.05)
    trainer.train()
