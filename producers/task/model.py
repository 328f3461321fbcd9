"""Building the model to fine-tune: the base causal LM, its tokenizer and the peft adapter.

The trainer calls these in order::

    check_quantization(cfg.model)                       # fail before anything loads
    path = prepare_base_model(cfg.model, run_dir, seed)  # "tiny" -> run_dir/base-model
    model, tokenizer = load_model_and_tokenizer(cfg.model, path)
    model = apply_adapter(model, cfg.adapter, total_steps)
    Trainer(model, ..., callbacks=adapter_callbacks(model))  # AdaLoRA's rank budget needs one

``tiny`` is a small, randomly initialised model of a real architecture (llama, qwen2, mistral,
glm4) with a byte-level tokenizer, built locally so that tests and demos need no hub. It is
saved like any checkpoint and loaded through the same ``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, get_session, is_offline_mode, try_to_load_from_cache
from peft import AdaLoraConfig, LoraConfig, PeftModel, PeftType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Glm4Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    TrainerCallback,
)

from producers.config import AdapterConfig, ModelConfig, TinyModel
from producers.task.tokenizer import build_byte_tokenizer
from runtime.errors import ConfigError

__all__ = [
    "BASE_MODEL_DIR",
    "AdaLoraBudget",
    "adapter_callbacks",
    "apply_adapter",
    "build_byte_tokenizer",
    "build_tiny_model",
    "check_quantization",
    "load_model_and_tokenizer",
    "parameter_counts",
    "prepare_base_model",
]

BASE_MODEL_DIR = "base-model"
"""Where a ``tiny`` base model is saved inside the run directory."""

HUB_PROBE_TIMEOUT_S = 3.0
"""How long to wait for the hub before calling it unreachable (instead of ~25 s of retries)."""

NOT_FOUND = "is not a local directory and could not be loaded from the Hugging Face hub"

VOCAB_MULTIPLE = 64
"""The tiny model's embedding rows are the tokenizer's length rounded up to this."""

TINY_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "glm4": Glm4Config,
}

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def build_tiny_model(tiny: TinyModel, tokenizer: Any, seed: int) -> PreTrainedModel:
    """A small randomly initialised causal LM of ``tiny.architecture``, sized for ``tokenizer``.

    Its vocabulary is ``len(tokenizer)`` padded with ``padded_vocab_size``; pad, bos and eos ids
    come from the tokenizer; input and output embeddings are tied.

    The same ``seed`` gives the same weights; the global torch RNG is left as it was.
    """
    if tiny.hidden_size % tiny.num_attention_heads:
        raise ConfigError(
            f"model.tiny.hidden_size: {tiny.hidden_size} is not a multiple of "
            f"model.tiny.num_attention_heads ({tiny.num_attention_heads})"
        )
    kv_heads = tiny.num_key_value_heads or tiny.num_attention_heads
    if tiny.num_attention_heads % kv_heads:
        raise ConfigError(
            f"model.tiny.num_key_value_heads: {kv_heads} does not divide "
            f"model.tiny.num_attention_heads ({tiny.num_attention_heads})"
        )
    config = TINY_CONFIGS[tiny.architecture](
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=kv_heads,
        # Glm4Config defaults head_dim to 128 whatever the hidden size; the others derive it.
        head_dim=tiny.hidden_size // tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # With a 259-token vocabulary the untied head would be most of a tiny model's weights.
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def padded_vocab_size(tokens: int) -> int:
    """Round the embedding table up to a multiple of ``VOCAB_MULTIPLE``, as real checkpoints do.

    The spare rows matter: transformers loads a ``qwen2`` checkpoint's tokenizer as
    ``Qwen2Tokenizer``, which adds ``<|endoftext|>`` (id 259 here) to whatever was saved.
    """
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def prepare_base_model(cfg: ModelConfig, run_dir: Path, seed: int) -> str:
    """Return what ``load_model_and_tokenizer`` should load.

    For ``tiny``: build and save the tokenizer and model to ``run_dir/base-model`` unless a
    previous attempt of this run already did (a resumed run must reuse the same base).
    Anything else (a hub id or a local path) is returned unchanged.
    """
    if cfg.name_or_path != "tiny":
        return cfg.name_or_path
    target = Path(run_dir) / BASE_MODEL_DIR
    if (target / "config.json").is_file():
        return str(target)
    # Save beside the target, then rename: a crash mid-save never leaves a half base to "reuse".
    partial = Path(run_dir) / f".{BASE_MODEL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(cfg.tiny, tokenizer, seed)
    tokenizer.save_pretrained(partial)
    model.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return str(target)


def check_quantization(cfg: ModelConfig) -> None:
    """Reject ``model.quantization`` on a machine that cannot run it, before anything loads."""
    if cfg.quantization == "none":
        return
    what = "4bit (QLoRA)" if cfg.quantization == "4bit" else cfg.quantization
    wanted = f"model.quantization: {what} needs a CUDA GPU and bitsandbytes"
    if not torch.cuda.is_available():
        raise ConfigError(f"{wanted}; this machine has no CUDA device (set model.quantization=none)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{wanted}; bitsandbytes is not installed (pip install bitsandbytes)")


def load_model_and_tokenizer(cfg: ModelConfig, path: str) -> tuple[Any, Any]:
    """Load the base model and tokenizer from a local directory or a hub id.

    A hub id is looked up in the local cache first, and only then on the hub, after a short
    reachability check, so that a typo or an offline machine gives one clear ConfigError at
    once. The tokenizer gets a pad token (its eos) if it has none.
    """
    check_quantization(cfg)
    local_only = _resolve_source(path, cfg.revision)
    common: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "local_files_only": local_only,
    }
    model_kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.quantization != "none":
        model_kwargs["quantization_config"] = _bnb_config(cfg)
        model_kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(path, **common, **model_kwargs)
    except (OSError, ValueError) as exc:
        where = "could not be loaded" if Path(path).expanduser().is_dir() else NOT_FOUND
        raise ConfigError(f"model.name_or_path: {path!r} {where} ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless in training and conflicts with checkpointing
    return model, tokenizer


def apply_adapter(model: Any, cfg: AdapterConfig, total_steps: int) -> PeftModel:
    """Wrap ``model`` with the adapter ``cfg`` asks for; only the adapter's weights stay trainable.

    ``total_steps`` is AdaLoRA's budget schedule length (ignored by LoRA and DoRA). With AdaLoRA
    the training loop must also call ``model.base_model.update_and_allocate(step)`` after each
    optimizer step to prune ranks towards ``r`` (``adapter_callbacks`` does it for a Trainer).
    """
    _check_target_modules(model, cfg.target_modules)
    peft_config: LoraConfig
    if cfg.method == "adalora":
        if cfg.adalora_tinit >= total_steps - cfg.adalora_tfinal:
            raise ConfigError(
                f"adapter.adalora_tinit ({cfg.adalora_tinit}) + adapter.adalora_tfinal ({cfg.adalora_tfinal}) "
                f"leave no budgeting phase in {total_steps} training steps"
            )
        peft_config = AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=cfg.adalora_init_r,
            target_r=cfg.r,
            tinit=cfg.adalora_tinit,
            tfinal=cfg.adalora_tfinal,
            deltaT=cfg.adalora_delta_t,
            total_step=total_steps,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            bias=cfg.bias,
            modules_to_save=cfg.modules_to_save or None,
        )
    else:
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            bias=cfg.bias,
            use_dora=cfg.method == "dora",
            modules_to_save=cfg.modules_to_save or None,
        )
    with warnings.catch_warnings():
        # Two warnings a user cannot act on: peft's about tied embeddings in modules_to_save
        # (intended for the tiny model; the predictor's merge unties them, consumers/predict/serving.py)
        # and transformers' deprecation of the property peft itself reads.
        warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True`", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model: PeftModel = get_peft_model(model, peft_config)
    return peft_model


class AdaLoraBudget(TrainerCallback):
    """Runs AdaLoRA's rank-budget update after every optimizer step of a ``transformers.Trainer``.

    The Trainer does not do this by itself; without it AdaLoRA never prunes a rank.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After ``optimizer.step()`` and before ``zero_grad()``: the gradients are still there."""
        update: Any = self.model.base_model.update_and_allocate
        update(state.global_step)


def adapter_callbacks(model: PeftModel) -> list[TrainerCallback]:
    """The Trainer callbacks ``model``'s adapter needs: AdaLoRA's budget update, or none."""
    peft_type = model.peft_config[model.active_adapter].peft_type
    return [AdaLoraBudget(model)] if peft_type == PeftType.ADALORA else []


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted unpacked."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            count *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def linear_module_names(model: Any) -> list[str]:
    """The distinct last-part names of the model's linear layers (what target_modules match)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def _check_target_modules(model: Any, target_modules: list[str] | str) -> None:
    if isinstance(target_modules, str):  # "all-linear": peft picks them (and skips the output head)
        return
    module_names = [name for name, _ in model.named_modules()]
    missing = [
        target
        for target in target_modules
        if not any(name == target or name.endswith(f".{target}") for name in module_names)
    ]
    if missing:
        available = ", ".join(linear_module_names(model)) or "none"
        raise ConfigError(
            f"adapter.target_modules: {', '.join(map(repr, missing))} not found in "
            f"{type(model).__name__}; its linear modules are: {available}"
        )


def _resolve_source(path: str, revision: str | None) -> bool:
    """Decide how to load ``path``: True to load local files only, False to go to the hub.

    Raises ConfigError at once for a missing local path, and for a hub id that is neither in
    the cache nor reachable (instead of waiting through the hub client's retries).
    """
    if Path(path).expanduser().is_dir():
        return True
    base = f"model.name_or_path: {path!r} {NOT_FOUND}"
    if _looks_like_path(path):
        raise ConfigError(f"{base} (no such directory, and not a hub id)")
    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    if is_offline_mode():
        raise ConfigError(f"{base} (not in the local cache and HF_HUB_OFFLINE is set)")
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport failure means the same thing here: no hub
        raise ConfigError(f"{base} (hub unreachable: {_first_line(exc)})") from None
    return False


def _looks_like_path(path: str) -> bool:
    """A name a hub id can never be: absolute, relative with dots, home-relative, or deeper than org/name."""
    return path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1


def _bnb_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[cfg.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute if isinstance(compute, torch.dtype) else torch.bfloat16,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
