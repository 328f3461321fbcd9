"""A checkpoint in memory and the answers it gives: serving is evaluation, one text at a time.

``load_served`` builds the base model and tokenizer with the trainer's own functions
(``producers.task.model``) and merges the checkpoint's adapter into it; ``answer_jobs`` scores the label
set with ``producers.task.evaluation.label_probabilities`` on ``classifier_prompt`` (the prompt of
training and evaluation) and decides with ``producers.task.metrics.decide`` (the same abstention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from consumers.predict.checkpoints import Chosen
from consumers.predict.rationale import generate_rationales, rationale_prefix
from producers.task.data import Example
from producers.task.evaluation import answer_options, classifier_prompt, label_probabilities, prompt_token_limit
from producers.task.labels import LabelSet, load_labels
from producers.task.metrics import decide
from producers.task.model import BASE_MODEL_DIR, load_model_and_tokenizer
from runtime.errors import ConfigError
from runtime.settings import packaged
from schemas.predict import Answer, CheckpointRef, MetadataValue

NULL = "null"
"""Key of the abstention option in ``Answer.probabilities`` (the JSON the model writes for it)."""


@dataclass(frozen=True)
class Job:
    """One request's texts: all of them are answered by the same checkpoint."""

    texts: tuple[str, ...]
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    rationale: bool = True


@dataclass(frozen=True)
class Served:
    """A loaded checkpoint and everything its answers need."""

    model: Any
    tokenizer: Any
    labels: LabelSet
    system_prompt: str
    max_length: int
    ref: CheckpointRef
    chosen: Chosen
    prompt_limit: int
    """Most prompt tokens a text may make; evaluation would cut a longer prompt, serving refuses it."""


def labels_path(chosen: Chosen, override: str | None) -> Path:
    """The label file: ``override``, else the run's ``data.labels_file`` here or in trainbus's folder."""
    name = override or chosen.config.data.labels_file
    candidate = Path(packaged(name))
    if candidate.is_file():
        return candidate
    raise ConfigError(f"labels file {name!r} not found (the run's data.labels_file; pass --labels FILE)")


def base_model_path(chosen: Chosen) -> str:
    """What the run's base model loads from: its saved ``tiny`` model, else its hub id or path."""
    if chosen.config.model.name_or_path != "tiny":
        return chosen.config.model.name_or_path
    base = chosen.path.parent / BASE_MODEL_DIR
    if not (base / "config.json").is_file():
        raise ConfigError(f"run {chosen.run_id}: its tiny base model is missing from {base}")
    return str(base)


def load_served(chosen: Chosen, *, labels_file: str | None = None) -> Served:
    """Base model + the checkpoint's adapter, merged, in eval mode, on the GPU when there is one.

    Merging folds the adapter into the base weights: the same function, computed about twice as
    fast (an unmerged LoRA runs extra matmuls on every adapted layer). A quantized base stays
    unmerged, since folding into 4/8-bit weights would round the adapter away.
    """
    labels = load_labels(labels_path(chosen, labels_file))
    model_cfg = chosen.config.model.model_copy(update={"gradient_checkpointing": False})
    base, tokenizer = load_model_and_tokenizer(model_cfg, base_model_path(chosen))
    model: Any = PeftModel.from_pretrained(base, str(chosen.path))
    if model_cfg.quantization == "none":
        model = model.merge_and_unload()  # peft unties input/output embeddings if the adapter trained both
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    max_length = chosen.config.data.max_length
    widest = max(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in answer_options(labels))
    return Served(
        model=model,
        tokenizer=tokenizer,
        labels=labels,
        system_prompt=chosen.config.data.system_prompt,
        max_length=max_length,
        ref=CheckpointRef(run_id=chosen.run_id, step=chosen.step, sha256=chosen.sha256),
        chosen=chosen,
        prompt_limit=prompt_token_limit(widest, max_length),
    )


def prompts_of(served: Served, job: Job) -> list[str]:
    """The evaluation prompt of each text of ``job``."""
    return [
        classifier_prompt(Example(text, None, "", dict(job.metadata), "request"), served.system_prompt)
        for text in job.texts
    ]


def too_long(served: Served, job: Job) -> tuple[int, int] | None:
    """(index, tokens) of the first text whose prompt is longer than the model reads, else None."""
    for i, prompt in enumerate(prompts_of(served, job)):
        tokens = len(served.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if tokens > served.prompt_limit:
            return i, tokens
    return None


def answer_jobs(served: Served, jobs: Sequence[Job], rationale_tokens: int) -> list[list[Answer]]:
    """Answers to every text of every job, in one model call (plus one generation for rationales)."""
    prompts = [prompt for job in jobs for prompt in prompts_of(served, job)]
    wants = [job.rationale for job in jobs for _ in job.texts]
    probs = label_probabilities(
        served.model, served.tokenizer, prompts, served.labels, batch_size=len(prompts), max_length=served.max_length
    )
    decisions = decide(probs, served.labels)
    asked = [i for i, want in enumerate(wants) if want]
    written = generate_rationales(
        served.model, served.tokenizer, [rationale_prefix(prompts[i], decisions[i]) for i in asked], rationale_tokens
    )
    rationales: dict[int, str] = dict(zip(asked, written, strict=True))
    names = [*served.labels.names, NULL]
    flat = [
        Answer(
            decision=decisions[i],
            abstain=decisions[i] is None,
            rationale=rationales.get(i),
            probabilities={name: float(p) for name, p in zip(names, probs[i], strict=True)},
            checkpoint=served.ref,
        )
        for i in range(len(prompts))
    ]
    out: list[list[Answer]] = []
    for job in jobs:
        out.append(flat[: len(job.texts)])
        flat = flat[len(job.texts) :]
    return out
