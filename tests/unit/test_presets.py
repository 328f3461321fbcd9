"""The model presets in configs/presets: each loads, says how to run it, and its adapter trains.

The real checkpoints are 7-9B parameters and need the hub, so each preset's adapter settings are
put on a tiny random model of the same architecture and trained a few steps with the real
``transformers.Trainer`` on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import Trainer, TrainingArguments

from producers.config import RunConfig
from producers.task.model import (
    apply_adapter,
    build_byte_tokenizer,
    build_tiny_model,
    check_quantization,
    load_model_and_tokenizer,
    prepare_base_model,
)
from runtime.settings import load_config

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
HUB_IDS = {
    "qwen2.5-7b.yaml": ("Qwen/Qwen2.5-7B-Instruct", "qwen2"),
    "llama-3-8b.yaml": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama"),
    "mistral-7b.yaml": ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    "glm-4-9b.yaml": ("THUDM/glm-4-9b-chat-hf", "glm4"),
}
STEPS = 3


def load_preset(name: str) -> RunConfig:
    return load_config(RunConfig, PRESET_DIR / name, environ={})


def test_every_preset_is_covered() -> None:
    assert sorted(p.name for p in PRESET_DIR.glob("*.yaml")) == sorted(HUB_IDS)


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_preset_loads_and_first_line_is_its_command(name: str) -> None:
    cfg = load_preset(name)
    first_line = (PRESET_DIR / name).read_text().splitlines()[0]
    assert first_line == f"# trainbus train configs/presets/{name}"
    hub_id, architecture = HUB_IDS[name]
    assert cfg.model.name_or_path == hub_id
    assert cfg.model.tiny.architecture == architecture
    assert cfg.model.dtype == "bfloat16"


def documented_dry_run(name: str) -> list[str]:
    """The ``--set`` overrides the preset's comment gives for a dry run on CPU."""
    for line in (PRESET_DIR / name).read_text().splitlines():
        if line.strip().startswith("#") and "model.name_or_path=tiny" in line:
            return re.findall(r"--set (\S+)", line)
    raise AssertionError(f"{name}: no dry-run command in its comments")


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_documented_dry_run_builds_and_loads_the_tiny_stand_in(name: str, tmp_path: Path) -> None:
    cfg = load_config(RunConfig, PRESET_DIR / name, documented_dry_run(name), environ={})
    check_quantization(cfg.model)  # the CPU dry run must not ask for a GPU
    model, tokenizer = load_model_and_tokenizer(cfg.model, prepare_base_model(cfg.model, tmp_path, seed=0))
    model = apply_adapter(model, cfg.adapter, total_steps=cfg.training.max_steps)
    assert not cfg.training.bf16 and model.dtype == torch.bfloat16
    ids = tokenizer("risk?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def random_sequences(rows: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def mean_loss(model: Any, rows: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    inputs = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        return float(model(**inputs).loss)


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_preset_adapter_trains_a_tiny_model_of_its_architecture(name: str, tmp_path: Path) -> None:
    cfg = load_preset(name)
    tokenizer = build_byte_tokenizer()
    tiny = cfg.model.tiny.model_copy(
        update={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
    )
    model = apply_adapter(build_tiny_model(tiny, tokenizer, seed=0), cfg.adapter, total_steps=STEPS)

    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert isinstance(cfg.adapter.target_modules, list)
    assert set(cfg.adapter.target_modules) <= adapted, "a target module matched nothing"

    data = random_sequences(rows=4, length=24, seed=1)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    after = mean_loss(model, data)

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS and all(torch.isfinite(torch.tensor(logged)))
    assert after < before
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
