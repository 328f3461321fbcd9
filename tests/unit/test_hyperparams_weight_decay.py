"""`trainbus ctl set weight_decay=…` changes the decay of the decayed parameters only, as
Hugging Face's Trainer groups them (weights decay; biases and norms never do)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerState, TrainingArguments

from producers.run.hyperparams import apply


def test_weight_decay_reaches_the_decayed_group_only(tmp_path: Path) -> None:
    decayed, exempt = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": 0.0}, {"params": [exempt], "weight_decay": 0.0}], lr=1e-3
    )
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.0, report_to=[], use_cpu=True)
    effective = apply({"weight_decay": 0.05, "max_grad_norm": 0.5}, args, TrainerState(), optimizer, None)
    assert effective == {"weight_decay": 0.05, "max_grad_norm": 0.5}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert args.weight_decay == 0.05 and args.max_grad_norm == 0.5
    single = torch.optim.AdamW([decayed], lr=1e-3, weight_decay=0.0)  # one group: it is the decayed one
    apply({"weight_decay": 0.1}, args, TrainerState(), single, None)
    assert single.param_groups[0]["weight_decay"] == 0.1
