"""The merged export: the served model (base with the adapter folded in) saved for plain transformers.

``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)`` need
neither peft nor trainbus; ``trainbus-export.json`` beside them says which checkpoint it is and
how to ask it (the prompt layout, the options scored, the abstention threshold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftModel

from consumers.predict.serving import Served
from producers.task.data import ANSWER_PREFIX
from producers.task.evaluation import answer_options
from runtime.errors import ConfigError

EXPORT_INFO = "trainbus-export.json"


def export_info(served: Served) -> dict[str, Any]:
    """What a plain-transformers user needs to ask the merged model as trainbus does."""
    chosen = served.chosen
    return {
        "run_id": chosen.run_id,
        "step": chosen.step,
        "checkpoint_path": str(chosen.path),
        "checkpoint_sha256": chosen.sha256,
        "verdict": chosen.verdict,
        "forced": chosen.forced,
        "system_prompt": served.system_prompt,
        "prompt": "<system_prompt>\\n<key>: <value> per metadata item, keys sorted\\nText: <text>\\nAnswer: "
        + ANSWER_PREFIX,
        "options": answer_options(served.labels),
        "labels": served.labels.names,
        "abstain_threshold": served.labels.abstain_threshold,
        "max_length": served.max_length,
    }


def export_merged(served: Served, out: Path) -> None:
    """Write the merged model, its tokenizer and ``trainbus-export.json`` to ``out`` (new or empty)."""
    if isinstance(served.model, PeftModel):
        raise ConfigError(
            f"run {served.chosen.run_id}: a quantized base cannot be merged and saved for plain transformers"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        served.model.save_pretrained(out)
        served.tokenizer.save_pretrained(out)
        (out / EXPORT_INFO).write_text(json.dumps(export_info(served), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"--merge {out}: cannot write: {exc.strerror}") from None
