"""The run config: one typed model per run, loaded from YAML (``trainbus train CONFIG``).

Sections ``model``, ``adapter``, ``data``, ``training`` and ``publish`` sit beside the shared
``Settings`` sections (bus, stream, server, log, state_dir), so ``--set bus.url=…`` works on any
run config and a run config never has to name the bus. ``training`` keys use Hugging Face
``TrainingArguments`` names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from runtime.settings import Section, Settings


class TinyModel(Section):
    """Shape of the locally built model used when ``model.name_or_path`` is ``tiny``."""

    architecture: Literal["llama", "qwen2", "mistral", "glm4"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(512, ge=16)


class ModelConfig(Section):
    """Which causal LM to fine-tune."""

    name_or_path: str = "tiny"
    """A Hugging Face model id, a local path, or ``tiny`` (built from ``tiny`` and saved to the run dir)."""
    tiny: TinyModel = TinyModel()
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA: needs CUDA and bitsandbytes; rejected on a CPU machine before anything loads."""
    trust_remote_code: bool = False
    revision: str | None = None
    gradient_checkpointing: bool = False


class AdapterConfig(Section):
    """The peft adapter."""

    method: Literal["lora", "dora", "adalora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapter (peft's ``modules_to_save``), e.g. embed_tokens, lm_head."""
    adalora_init_r: int = Field(12, ge=1)
    """AdaLoRA: initial rank per matrix (budget is pruned towards ``r``)."""
    adalora_tinit: int = Field(0, ge=0)
    adalora_tfinal: int = Field(0, ge=0)
    adalora_delta_t: int = Field(1, ge=1)


class DataConfig(Section):
    """Where the JSONL data is, and the label set."""

    train_file: str = "runs/sample-data/train.jsonl"
    validation_file: str | None = "runs/sample-data/validation.jsonl"
    test_file: str | None = "runs/sample-data/test.jsonl"
    labels_file: str = "configs/labels.yaml"
    generate_sample: bool = True
    """Write the deterministic sample data set first when ``train_file`` does not exist yet."""
    max_length: int = Field(256, ge=16)
    skip_invalid: bool = False
    """Skip malformed rows (and report how many) instead of failing on the first."""
    system_prompt: str = (
        "Classify the risk of the text as HIGH_RISK, MEDIUM_RISK, LOW_RISK or NO_RISK. "
        'Answer with JSON: {"decision": LABEL or null, "rationale": str, "abstain": bool}.'
    )
    max_eval_samples: int | None = Field(None, ge=1)


class TrainingConfig(Section):
    """Training hyper-parameters, named as in ``transformers.TrainingArguments``."""

    output_dir: str = "runs"
    """Parent of run directories: each run writes to ``<output_dir>/<run_id>``."""
    max_steps: int = Field(60, ge=1)
    num_train_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-3, gt=0, allow_inf_nan=False)
    lr_scheduler_type: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(20, ge=1)
    save_steps: int | None = Field(20, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    optim: str = "adamw_torch"
    dataloader_num_workers: int = Field(0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    """Any other ``TrainingArguments`` field, passed through as is."""


class PublishConfig(Section):
    """How the trainer publishes."""

    heartbeat_seconds: float = Field(2.0, gt=0)
    memory_limit: int = Field(10_000, ge=1)
    """Pending events kept in memory while the bus is away; beyond it they spill to the outbox."""
    close_timeout: float = Field(10.0, gt=0)
    enabled: bool = True
    """False: train offline with a null sink."""
    offline_ok: bool = False
    """True: an unreachable bus does not stop the run; events wait in the outbox until it connects (``--offline-ok``)."""


class RunConfig(Settings):
    """Everything one fine-tuning run needs."""

    run_name: str = Field("run", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    """Prefix of generated run ids (``<run_name>-<timestamp>``)."""
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    publish: PublishConfig = PublishConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.training.bf16 and self.training.fp16:
            raise ValueError("training.bf16 and training.fp16 are exclusive")
        return self
