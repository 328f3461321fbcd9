"""Model building: the byte tokenizer, the tiny base model, loading, adapters and early errors.

Everything runs on CPU with 2-layer models of width 32; nothing touches the hub.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, Trainer, TrainingArguments

from producers.config import AdapterConfig, ModelConfig, TinyModel
from producers.task.model import (
    adapter_callbacks,
    apply_adapter,
    build_byte_tokenizer,
    build_tiny_model,
    check_quantization,
    load_model_and_tokenizer,
    parameter_counts,
    prepare_base_model,
)
from runtime.errors import ConfigError

CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "glm4": "Glm4ForCausalLM",
}
ARCHITECTURES = list(CAUSAL_LM_CLASSES)
TEXTS = [
    "plain ascii, with  two spaces and a tab\t",
    "héllo wörld — ünïcödé",
    "中文 日本語 한국어 🙂🚀",
    "line one\nline two\r\n\x00 and a null byte",
]


def tiny(architecture: str = "llama") -> TinyModel:
    return TinyModel(
        architecture=architecture,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_tokenizer()


def batch(seed: int = 0, rows: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def loss_on(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**inputs).loss)


def train(model: Any, inputs: dict[str, torch.Tensor], steps: int = 8, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text_one_token_per_byte(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_has_pad_bos_eos_and_survives_save_and_load(tokenizer: Any, tmp_path: Path) -> None:
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(specials) == 3 and min(specials) >= 256
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token_id == tokenizer.eos_token_id
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi\n<|assistant|>\n"


# --- tiny model --------------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(tokenizer: Any) -> None:
    first, again, other = (build_tiny_model(tiny(), tokenizer, seed).state_dict() for seed in (7, 7, 8))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_tiny_model_uses_the_tokenizer_ids(tokenizer: Any) -> None:
    model = build_tiny_model(tiny(), tokenizer, seed=0)
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tiny_shape_that_cannot_split_into_heads_is_a_config_error(tokenizer: Any) -> None:
    bad = tiny().model_copy(update={"hidden_size": 30})
    with pytest.raises(ConfigError, match=r"model\.tiny\.hidden_size"):
        build_tiny_model(bad, tokenizer, seed=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_tiny_base_loads_through_from_pretrained_with_same_logits(
    architecture: str, tokenizer: Any, tmp_path: Path
) -> None:
    cfg = ModelConfig(name_or_path="tiny", tiny=tiny(architecture))
    path = prepare_base_model(cfg, tmp_path, seed=3)
    assert Path(path) == tmp_path / "base-model"

    model, loaded_tokenizer = load_model_and_tokenizer(cfg, path)

    assert type(model).__name__ == CAUSAL_LM_CLASSES[architecture]
    text = "risk: höch 🙂"
    ids = loaded_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == [tokenizer(text)["input_ids"]]
    reference = build_tiny_model(cfg.tiny, tokenizer, seed=3).eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)


def test_resumed_run_reuses_the_saved_base(tokenizer: Any, tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path="tiny", tiny=tiny())
    first = prepare_base_model(cfg, tmp_path, seed=1)
    saved = (Path(first) / "model.safetensors").read_bytes()
    again = prepare_base_model(cfg, tmp_path, seed=2)  # a different seed must not rebuild it
    assert again == first
    assert (Path(again) / "model.safetensors").read_bytes() == saved


def test_hub_id_or_local_path_is_returned_unchanged(tmp_path: Path) -> None:
    for name in ("Qwen/Qwen2.5-7B-Instruct", "/models/local-llama"):
        assert prepare_base_model(ModelConfig(name_or_path=name), tmp_path, seed=0) == name
    assert not (tmp_path / "base-model").exists()


def test_gradient_checkpointing_still_trains_the_adapter(tokenizer: Any, tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path="tiny", tiny=tiny(), gradient_checkpointing=True)
    model, _ = load_model_and_tokenizer(cfg, prepare_base_model(cfg, tmp_path, seed=0))
    assert model.is_activation_checkpointing
    peft_model = apply_adapter(model, AdapterConfig(dropout=0.0), total_steps=10)
    peft_model.train()
    peft_model(**batch()).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


# --- adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_adapter_trains_only_its_own_weights_and_lowers_the_loss(method: str, tokenizer: Any) -> None:
    model = build_tiny_model(tiny(), tokenizer, seed=0)
    cfg = AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, adalora_init_r=6)
    peft_model = apply_adapter(model, cfg, total_steps=8)

    assert isinstance(peft_model, PeftModel)
    trainable = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable), sorted(trainable)
    n_trainable, n_total = parameter_counts(peft_model)
    assert n_trainable == sum(p.numel() for p in trainable.values()) and 0 < n_trainable < n_total
    base_name = next(n for n, _ in peft_model.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    base_before = peft_model.get_parameter(base_name).detach().clone()

    inputs = batch()
    before = loss_on(peft_model, inputs)
    train(peft_model, inputs)
    after = loss_on(peft_model, inputs)

    assert after < before
    changed = [
        name for name, p in peft_model.named_parameters() if name in trainable and not torch.equal(p, trainable[name])
    ]
    assert changed == list(trainable)
    assert torch.equal(peft_model.get_parameter(base_name), base_before)


def test_adalora_prunes_ranks_to_its_budget_under_the_trainer(tokenizer: Any, tmp_path: Path) -> None:
    steps, init_r, target_r = 6, 6, 2
    model = build_tiny_model(tiny(), tokenizer, seed=0)
    cfg = AdapterConfig(
        method="adalora", r=target_r, adalora_init_r=init_r, adalora_tinit=1, adalora_tfinal=2, dropout=0.0
    )
    peft_model = apply_adapter(model, cfg, total_steps=steps)
    assert [type(c).__name__ for c in adapter_callbacks(peft_model)] == ["AdaLoraBudget"]
    inputs = batch(rows=4)
    rows = [{key: value[i] for key, value in inputs.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=peft_model, args=args, train_dataset=rows, callbacks=adapter_callbacks(peft_model)).train()

    kept = getattr(peft_model.peft_config["default"], "rank_pattern", None)
    assert kept, "the budget update never ran"
    assert sum(sum(mask) for mask in kept.values()) == target_r * len(kept)


def test_lora_needs_no_callbacks(tokenizer: Any) -> None:
    peft_model = apply_adapter(build_tiny_model(tiny(), tokenizer, seed=0), AdapterConfig(), total_steps=10)
    assert adapter_callbacks(peft_model) == []


def test_unknown_target_module_names_the_field_and_the_real_modules(tokenizer: Any) -> None:
    model = build_tiny_model(tiny("glm4"), tokenizer, seed=0)
    with pytest.raises(ConfigError) as caught:
        apply_adapter(model, AdapterConfig(target_modules=["q_proj", "gate_proj"]), total_steps=10)
    message = str(caught.value)
    assert message.startswith("adapter.target_modules:") and "'gate_proj'" in message
    assert "gate_up_proj" in message and "\n" not in message


def test_all_linear_targets_every_projection(tokenizer: Any) -> None:
    model = build_tiny_model(tiny(), tokenizer, seed=0)
    peft_model = apply_adapter(model, AdapterConfig(target_modules="all-linear"), total_steps=10)
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- early errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_cuda_is_refused_before_loading(
    quantization: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(quantization=quantization)
    with pytest.raises(ConfigError, match=rf"^model\.quantization: {quantization}.*no CUDA device"):
        check_quantization(cfg)
    # The path does not exist either: the quantization error must come first, before any loading.
    with pytest.raises(ConfigError, match=r"^model\.quantization"):
        load_model_and_tokenizer(cfg, str(tmp_path / "missing"))


def test_no_quantization_passes_the_check() -> None:
    check_quantization(ModelConfig())


@pytest.mark.parametrize("name", ["./models/missing", "no-such-org/no-such-model"])
def test_unknown_model_is_one_line_config_error_at_once(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach for the network here
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_model_and_tokenizer(ModelConfig(name_or_path=name), name)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith(f"model.name_or_path: {name!r} is not a local directory") and "\n" not in message
