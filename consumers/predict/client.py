"""Calling the predictor from any process on the bus: which aliases are served, and a prediction.

    aliases = await served_aliases(nc)                    # every replica's $SRV.INFO, by alias
    answers = await predict(nc, "risk", ["some text"])    # one Answer per text

``trainbus predict`` is a thin CLI over these; a dashboard page calls them the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from runtime.errors import ConfigError, TrainbusError
from schemas.predict import Answer, MetadataValue, PredictReply, PredictRequest
from schemas.subjects import predict_subject

SERVICE_NAME = "trainbus-predict"
"""The ``nats.micro`` service name every predictor registers (``$SRV.INFO.trainbus-predict``)."""


REQUEST_FIELDS = ", ".join(PredictRequest.model_fields)


def describe_invalid(exc: ValidationError) -> str:
    """One line naming what is wrong with a request (the service's 400 reply, the client's own check)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "json_invalid":
        text = f"not JSON: {str(err['msg']).removeprefix('Invalid JSON: ')}"
    elif err["type"] == "extra_forbidden":
        text = f"{where}: unknown field (fields: {REQUEST_FIELDS})"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
        text = f"{where}: {message}" if where else message
    return " ".join(text.split())


class NoService(TrainbusError):
    """Nobody serves the alias (or the server did not let this user ask)."""

    exit_code = 3


class PredictFailed(TrainbusError):
    """The predictor answered with an error: ``code`` 4xx for a bad request (exit 2), else 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.exit_code = 2 if code.startswith("4") else 1


@dataclass
class ServedAlias:
    """One alias and the replicas serving it, as their ``$SRV.INFO`` says."""

    alias: str
    subject: str
    run_id: str
    replicas: list[str] = field(default_factory=list)
    """Service instance ids."""
    steps: list[int] = field(default_factory=list)
    """Checkpoint step each replica serves (the same unless a hot swap is under way)."""
    metadata_seen: dict[str, list[str]] = field(default_factory=dict)
    """The metadata keys the served model was trained with, each with the values seen: optional
    ``metadata`` of a request (empty from a predictor that does not say)."""


def _metadata_seen(raw: Any) -> dict[str, list[str]]:
    """The ``metadata_seen`` of an endpoint's INFO metadata (JSON in a string), or {} if unreadable."""
    try:
        seen = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        return {}
    if not isinstance(seen, dict):
        return {}
    return {str(k): [str(v) for v in values] for k, values in seen.items() if isinstance(values, list)}


async def served_aliases(nc: NATS, *, wait: float = 1.0) -> list[ServedAlias]:
    """Every alias some predictor serves now, by asking all of them for ``$SRV.INFO`` for ``wait`` seconds."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: dict[str, ServedAlias] = {}
    try:
        await nc.publish(f"$SRV.INFO.{SERVICE_NAME}", b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            try:
                info = json.loads(msg.data)
            except ValueError:
                continue
            for endpoint in info.get("endpoints") or []:
                meta = endpoint.get("metadata") or {}
                if "alias" not in meta:
                    continue
                entry = found.setdefault(meta["alias"], ServedAlias(meta["alias"], endpoint["subject"], meta["run_id"]))
                entry.replicas.append(str(info.get("id")))
                if str(meta.get("step", "")).isdigit():
                    entry.steps.append(int(meta["step"]))
                entry.metadata_seen = entry.metadata_seen or _metadata_seen(meta.get("metadata_seen"))
    finally:
        await sub.unsubscribe()
    return sorted(found.values(), key=lambda a: a.alias)


async def predict(
    nc: NATS,
    alias: str,
    texts: Sequence[str],
    *,
    metadata: dict[str, MetadataValue] | None = None,
    rationale: bool = True,
    timeout: float = 30.0,
) -> list[Answer]:
    """The predictor's answers to ``texts`` (one request); ``NoService`` when nobody serves ``alias``."""
    subject = predict_subject(alias)
    try:
        request = PredictRequest(texts=list(texts), metadata=metadata or {}, rationale=rationale)
    except ValidationError as exc:  # the service would refuse it: say so without asking
        raise ConfigError(describe_invalid(exc)) from None
    try:
        msg = await nc.request(subject, request.model_dump_json(exclude_defaults=True).encode(), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise NoService(f"no predictor serves {alias!r} (nobody answers on {subject})") from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise NoService(f"no predictor answered on {subject} within {timeout:g}s") from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise PredictFailed(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "error"))
    try:
        return PredictReply.model_validate_json(msg.data).answers
    except ValidationError as exc:
        raise TrainbusError(f"the predictor on {subject} sent a reply that is not a PredictReply: {exc}") from None
