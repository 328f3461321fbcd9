"""The run config: one typed model per run, loaded from YAML (``trainbus train CONFIG``).

Sections ``model``, ``adapter``, ``data``, ``training`` and ``publish`` sit beside the shared
``Settings`` sections (bus, stream, server, log, state_dir), so ``--set bus.url=…`` works on any
run config and a run config never has to name the bus. ``training`` keys use Hugging Face
``TrainingArguments`` names, and any ``TrainingArguments`` field may be set there
(``producers.run.arguments`` checks them against ``TrainingArguments`` itself).

A relative path written in a config file is relative to that file (``runtime.settings``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, ValidatorFunctionWrapHandler, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from runtime.settings import PATH, ConfigPath, Section, Settings, did_you_mean, packaged

SAMPLE_FOLDERS = {"classify": "runs/sample-data", "chat": "runs/sample-chat"}
"""Where each task's sample data set is written (relative to the current folder) when no file is named."""


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

    name_or_path: Annotated[str, ConfigPath(dotted_only=True)] = "tiny"
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
    """What the model learns (``task``), where the JSONL data is, and the label set."""

    task: Literal["classify", "chat"] = "classify"
    """``classify``: the risk classifier (text, label, rationale rows). ``chat``: supervised
    fine-tuning on conversations (``messages`` rows, OpenAI or ShareGPT shape), formatted with
    the tokenizer's chat template, the loss on the assistant turns only."""
    train_file: Annotated[str, PATH] = "runs/sample-data/train.jsonl"
    """Default: the task's sample set (``runs/sample-data`` or ``runs/sample-chat``)."""
    validation_file: Annotated[str | None, PATH] = "runs/sample-data/validation.jsonl"
    test_file: Annotated[str | None, PATH] = "runs/sample-data/test.jsonl"
    labels_file: Annotated[str, PATH] = Field(default_factory=lambda: packaged("configs/labels.yaml"))
    """The classifier's label set; default ``configs/labels.yaml`` here, else trainbus's own."""
    generate_sample: bool = True
    """Write the deterministic sample data set first when ``train_file`` does not exist yet."""
    max_length: int = Field(256, ge=16)
    skip_invalid: bool = False
    """Skip malformed rows (and report how many) instead of failing on the first."""
    system_prompt: str = (
        "Classify the risk of the text as HIGH_RISK, MEDIUM_RISK, LOW_RISK or NO_RISK. "
        'Answer with JSON: {"decision": LABEL or null, "rationale": str, "abstain": bool}.'
    )
    metadata_dropout: float = Field(0.5, ge=0, le=1)
    """Share of the training examples whose prompt leaves out the metadata lines, drawn anew each
    epoch, so that a request with the text alone is answered as well as one with its metadata.
    0 keeps every prompt whole (a model that then only knows prompts with metadata)."""
    max_eval_samples: int | None = Field(None, ge=1)
    chat_template: str | None = None
    """``chat``: a Jinja chat template for a tokenizer that has none (default: the tokenizer's own)."""

    @model_validator(mode="before")
    @classmethod
    def _task_sample_files(cls, data: Any) -> Any:
        # the data files nobody named are the task's own sample set
        if isinstance(data, dict) and data.get("task") in SAMPLE_FOLDERS:
            folder = SAMPLE_FOLDERS[data["task"]]
            for split in ("train", "validation", "test"):
                data.setdefault(f"{split}_file", f"{folder}/{split}.jsonl")
        return data


@functools.cache
def argument_types() -> dict[str, Any]:
    """Every field ``transformers.TrainingArguments(...)`` accepts, with its type."""
    from transformers import TrainingArguments  # heavy: imported only for a config that sets more fields

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


def _accepts(kind: Any, value: Any) -> bool:
    try:
        TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def _argument_errors(extras: dict[str, Any], declared: list[str]) -> list[InitErrorDetails]:
    """A located error for each key that is not a ``TrainingArguments`` field or has the wrong type.

    YAML reads an unquoted ``no`` as false: for a field that takes a string but no boolean
    (``eval_strategy: no``), ``extras`` gets back the word that was written.
    """
    if not extras:
        return []
    types = argument_types()
    errors = []
    for key, value in extras.items():
        kind = types.get(key)
        if isinstance(value, bool) and kind is not None and not _accepts(kind, value) and _accepts(kind, "no"):
            extras[key] = value = "yes" if value else "no"
        if key not in types:
            hint = did_you_mean(key, [*types, *declared])
            kind = PydanticCustomError(
                "unknown_argument", "unknown key: not a TrainingArguments field{hint}", {"hint": hint}
            )
            errors.append(InitErrorDetails(type=kind, loc=(key,), input=value))
            continue
        try:
            TypeAdapter(types[key]).validate_python(value)
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).replace("{", "(").replace("}", ")")
            errors.append(InitErrorDetails(type=PydanticCustomError("argument_type", message), loc=(key,), input=value))
    return errors


class TrainingConfig(Section):
    """Training hyper-parameters, named as in ``transformers.TrainingArguments``.

    The fields below are the ones trainbus gives its own defaults; any other ``TrainingArguments``
    field (``eval_strategy``, ``report_to``, ``lr_scheduler_kwargs``, …) may be set beside them
    and is passed through, after ``producers.run.arguments.check_training`` has checked its name and
    value against ``TrainingArguments``.
    """

    model_config = ConfigDict(extra="allow")
    extra_paths: ClassVar[frozenset[str]] = frozenset(
        {"deepspeed", "fsdp_config", "accelerator_config", "resume_from_checkpoint"}
    )

    output_dir: Annotated[str, PATH] = "runs"
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

    def arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` fields set beyond the declared ones."""
        return dict(self.model_extra or {})

    @model_validator(mode="wrap")
    @classmethod
    def _training_arguments(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # every mistake of the section at once: the declared fields' and the passed-through ones'
        errors: list[InitErrorDetails] = []
        config = None
        if isinstance(data, dict) and isinstance(data.get("extra"), dict):
            # configs (and run.started events) written before any field could be set here kept them under `extra`
            data = {**{k: v for k, v in data.items() if k != "extra"}, **data["extra"]}
        try:
            config = handler(data)
        except ValidationError as exc:
            errors = [
                InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
                for e in exc.errors()
            ]
        if isinstance(data, dict):
            extras = {k: v for k, v in data.items() if k not in cls.model_fields}
            errors += _argument_errors(extras, list(cls.model_fields))
            if config is not None and config.model_extra is not None:
                config.model_extra.update(extras)
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config


class PublishConfig(Section):
    """How the trainer publishes."""

    heartbeat_seconds: float = Field(2.0, gt=0)
    window_ms: float = Field(30.0, ge=0, le=1000)
    """How long a ``train.step``, ``heartbeat`` or ``eval`` may wait for others to go with it in one
    batch (less bus CPU per event); other events go at once. 0: every event at once."""
    close_timeout: float = Field(10.0, gt=0)
    enabled: bool = True
    """False: train offline with a null sink."""
    offline_ok: bool = False
    """True: an unreachable bus does not stop the run; events wait in the outbox until it connects (``--offline-ok``)."""
    upload_checkpoints: bool = True
    """Put every checkpoint in the bus's object store (``TRAINBUS_CHECKPOINT_FILES``), so a resume on another
    machine and a predictor on another host fetch it; False when ``training.output_dir`` is a shared folder."""

    @model_validator(mode="before")
    @classmethod
    def _no_memory_limit(cls, data: Any) -> Any:
        # events wait in the run's outbox file, not in memory: a config, or a run.started snapshot,
        # that still sets memory_limit loads, and the value has no effect
        if isinstance(data, dict) and "memory_limit" in data:
            data = {k: v for k, v in data.items() if k != "memory_limit"}
        return data


class RunConfig(Settings):
    """Everything one fine-tuning run needs."""

    run_name: str = Field("run", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    """Prefix of generated run ids (``<run_name>-<timestamp>``)."""
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = Field(default_factory=DataConfig)  # its labels_file default depends on the folder
    training: TrainingConfig = TrainingConfig()
    publish: PublishConfig = PublishConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.training.bf16 and self.training.fp16:
            raise ValueError("training.bf16 and training.fp16 are exclusive")
        return self
