"""Where a base model comes from (a local folder, the hub cache, the hub) and the mistakes in
between, each a one-line ConfigError before any training; what a loaded base is given when it lacks
a pad token. Everything on CPU with width-32 models; nothing reaches the network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from transformers import BitsAndBytesConfig

from producers.config import AdapterConfig, ModelConfig, TinyModel
from producers.task.model import _bnb_config, apply_adapter, build_tiny_model, check_quantization, parameter_counts
from producers.task.model import load_model_and_tokenizer as load
from producers.task.tokenizer import build_byte_tokenizer
from runtime.errors import ConfigError

TINY = TinyModel(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_tokenizer()


def save_base(folder: Path, tokenizer: Any, *, pad: bool = True) -> Path:
    model = build_tiny_model(TINY, tokenizer, seed=0)
    if not pad:  # like many base checkpoints (Llama, Mistral): no pad token at all
        tokenizer = build_byte_tokenizer()
        tokenizer.pad_token = None
        model.config.pad_token_id = None
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def test_key_value_heads_that_do_not_divide_the_heads_are_a_config_error(tokenizer: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_tiny_model(TINY.model_copy(update={"num_key_value_heads": 3}), tokenizer, seed=0)
    assert str(info.value) == "model.tiny.num_key_value_heads: 3 does not divide model.tiny.num_attention_heads (4)"


def test_quantization_on_cuda_without_bitsandbytes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(ConfigError) as info:
        check_quantization(ModelConfig(quantization="4bit"))
    assert str(info.value) == (
        "model.quantization: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; "
        "bitsandbytes is not installed (pip install bitsandbytes)"
    )


def test_qlora_quantizes_to_nf4_with_double_quantization_and_the_configured_compute_dtype() -> None:
    qlora = _bnb_config(ModelConfig(quantization="4bit", dtype="float16"))
    assert isinstance(qlora, BitsAndBytesConfig) and qlora.load_in_4bit and not qlora.load_in_8bit
    assert qlora.bnb_4bit_quant_type == "nf4" and qlora.bnb_4bit_use_double_quant
    assert qlora.bnb_4bit_compute_dtype == torch.float16
    assert _bnb_config(ModelConfig(quantization="4bit", dtype="auto")).bnb_4bit_compute_dtype == torch.bfloat16
    assert _bnb_config(ModelConfig(quantization="8bit")).load_in_8bit


def test_a_folder_that_holds_no_model_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ConfigError) as info:
        load(ModelConfig(name_or_path=str(tmp_path)), str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"model.name_or_path: {str(tmp_path)!r} could not be loaded (") and "\n" not in message


def test_a_base_without_a_pad_token_pads_with_its_eos(tokenizer: Any, tmp_path: Path) -> None:
    path = save_base(tmp_path / "base", tokenizer, pad=False)
    model, loaded = load(ModelConfig(name_or_path=str(path)), str(path))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert model.config.pad_token_id == loaded.eos_token_id
    padded = loaded(["a", "abc"], padding=True)["input_ids"]  # batching works at all
    assert padded[0][-1] == loaded.eos_token_id


def test_a_hub_model_in_the_local_cache_loads_offline(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny-risk"
    save_base(repo / "snapshots" / "0123abcd", tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache alone must do
    model, loaded = load(ModelConfig(name_or_path="acme/tiny-risk"), "acme/tiny-risk")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == TINY.hidden_size
    assert loaded("héllo")["input_ids"] == tokenizer("héllo")["input_ids"]


def test_an_unreachable_hub_is_one_line_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(ConfigError) as info:
        load(ModelConfig(name_or_path="acme/not-cached"), "acme/not-cached")
    message = str(info.value)
    assert message.startswith("model.name_or_path: 'acme/not-cached' is not a local directory and could not be")
    assert "\n" not in message
    assert "(hub unreachable: " in message


def test_adalora_without_steps_left_to_budget_names_both_settings(tokenizer: Any) -> None:
    cfg = AdapterConfig(method="adalora", adalora_tinit=6, adalora_tfinal=4)
    with pytest.raises(ConfigError) as info:
        apply_adapter(build_tiny_model(TINY, tokenizer, seed=0), cfg, total_steps=10)
    assert str(info.value) == (
        "adapter.adalora_tinit (6) + adapter.adalora_tfinal (4) leave no budgeting phase in 10 training steps"
    )


def test_parameter_counts_of_a_plain_model_count_only_what_trains(tokenizer: Any) -> None:
    model = build_tiny_model(TINY, tokenizer, seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == (total, total)
    model.get_input_embeddings().weight.requires_grad_(False)
    frozen = model.get_input_embeddings().weight.numel()
    assert parameter_counts(model) == (total - frozen, total)
