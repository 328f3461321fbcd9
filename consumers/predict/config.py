"""The predictor's settings: a ``serve`` section beside the shared bus settings (configs/predict.yaml).

``trainbus serve --config configs/predict.yaml`` reads it; command-line flags win over it;
``trainbus up`` starts the predictor only when the file names a run (``serve.run``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from runtime.settings import Section, Settings
from schemas.common import RUN_ID_PATTERN
from schemas.predict import MAX_TEXTS

DEFAULT_CONFIG = "configs/predict.yaml"


class ServeConfig(Section):
    """What to serve and how requests are batched."""

    run: str | None = Field(None, pattern=RUN_ID_PATTERN)
    """The run whose audit-approved ``best`` checkpoint is served; unset: ``trainbus up`` serves nothing."""
    alias: str | None = Field(None, pattern=RUN_ID_PATTERN)
    """Name on the bus, ``trainbus.predict.<alias>``; default: the run id."""
    labels_file: str | None = None
    """Label set with the abstention threshold; default: the run config's ``data.labels_file``."""
    max_batch: int = Field(32, ge=1, le=MAX_TEXTS)
    """Most texts one model call takes; concurrent requests are joined up to this."""
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    """Longest a request waits for others to join its batch (only while requests keep coming)."""
    rationale_tokens: int = Field(48, ge=1, le=512)
    """Most tokens generated for one rationale."""
    threads: int | None = Field(None, ge=1)
    """torch threads of the model; default: torch's own choice."""


class PredictSettings(Settings):
    """Shared settings plus the predictor's ``serve`` section."""

    serve: ServeConfig = ServeConfig()


def default_config() -> Path | None:
    """``configs/predict.yaml`` here if there is one, else trainbus's own copy, else None."""
    for path in (Path(DEFAULT_CONFIG), Path(__file__).resolve().parents[2] / DEFAULT_CONFIG):
        if path.is_file():
            return path
    return None
