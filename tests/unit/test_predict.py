"""The predictor's pure parts: micro-batching, request checks, rationale parsing, answers, config."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from pydantic import ValidationError

from consumers.exporter.collector import RunCollector, build_registry
from consumers.exporter.state import ExporterState, handle
from consumers.predict.batching import MicroBatcher
from consumers.predict.checkpoints import Chosen, Refused, parse_best, verify
from consumers.predict.cli import service
from consumers.predict.client import describe_invalid
from consumers.predict.rationale import generate_rationales, string_value
from consumers.predict.serving import Job, Served, answer_jobs, prompts_of, too_long
from producers.config import RunConfig, TinyModel
from producers.task.evaluation import answer_options, label_probabilities, prompt_token_limit
from producers.task.labels import load_labels
from producers.task.metrics import decide
from producers.task.model import build_tiny_model
from producers.task.tokenizer import build_byte_tokenizer
from runtime.checkpoints import fingerprint
from runtime.cli.up import service_commands
from runtime.errors import NotFound
from schemas.export import json_schemas
from schemas.predict import CheckpointRef, PredictorLoaded, PredictRequest

REPO = Path(__file__).resolve().parents[2]


# ---- micro-batching ----------------------------------------------------------------------


class Recorder:
    """A ``run`` function that records its batches; ``gate`` holds the first batch until released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.fail_on = fail_on

    def __call__(self, jobs: list[str]) -> list[str]:
        if not self.batches:
            self.gate.wait(30)
        self.batches.append(list(jobs))
        if self.fail_on in jobs:
            raise RuntimeError("model broke")
        return [job.upper() for job in jobs]


async def test_requests_that_arrive_while_the_model_works_share_the_next_batch() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=4, max_wait=0.0).start()
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0)  # "a" starts alone; the model is now busy with it
    rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcdefg"]
    await asyncio.sleep(0)
    run.gate.set()
    assert await first == "A"
    assert [await r for r in rest] == list("BCDEFG")
    await batcher.close()
    assert run.batches[0] == ["a"]
    assert run.batches[1] == ["b", "c", "d", "e"]  # bounded by max_batch
    assert run.batches[2] == ["f", "g"]
    assert batcher.stats.largest == 4 and batcher.stats.items == 7


async def test_a_lone_request_does_not_wait_for_company() -> None:
    run = Recorder()
    run.gate.set()
    batcher = MicroBatcher(run, max_batch=32, max_wait=60.0).start()
    started = time.monotonic()
    assert await batcher.submit("x") == "X"
    assert await batcher.submit("y") == "Y"
    assert time.monotonic() - started < 30  # far below the 60 s it could have waited
    await batcher.close()


async def test_a_failed_batch_fails_only_its_requests_and_the_next_one_runs() -> None:
    run = Recorder(fail_on="bad")
    batcher = MicroBatcher(run, max_batch=2, max_wait=0.0).start()
    first = asyncio.ensure_future(batcher.submit("bad"))
    await asyncio.sleep(0)
    later = asyncio.ensure_future(batcher.submit("good"))
    run.gate.set()
    with pytest.raises(RuntimeError, match="model broke"):
        await first
    assert await later == "GOOD"
    await batcher.close()
    assert batcher.stats.failed_batches == 1


async def test_a_job_larger_than_the_batch_runs_alone_and_close_answers_everything() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=3, max_wait=0.0, size=len).start()
    futures = [asyncio.ensure_future(batcher.submit(x)) for x in ("ab", "cdef", "g")]
    await asyncio.sleep(0)
    run.gate.set()
    await batcher.close()  # everything submitted before close is answered
    assert [f.result() for f in futures] == ["AB", "CDEF", "G"]
    assert run.batches == [["ab"], ["cdef"], ["g"]]
    with pytest.raises(RuntimeError, match="shutting down"):
        await batcher.submit("late")


# ---- requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", "not JSON:"),
        (b'{"text": ""}', "text: must not be empty"),
        (b'{"texts": ["fine", "  "]}', "texts.1: must not be empty"),
        (b'{"text": "x", "colour": "red"}', "colour: unknown field (fields: text, texts, metadata, rationale)"),
        (b'{"text": "a", "texts": ["b"]}', "send exactly one of 'text' and 'texts'"),
        (b"{}", "send exactly one of 'text' and 'texts'"),
        (b'{"text": 5}', "text: Input should be a valid string"),
        (b'{"texts": []}', "texts: List should have at least 1 item"),
    ],
)
def test_a_bad_request_is_described_in_one_line_naming_the_field(payload: bytes, expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PredictRequest.model_validate_json(payload)
    message = describe_invalid(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_rationale_string_ends_at_the_first_unescaped_quote() -> None:
    assert string_value('Explicit threat.", "abstain": false}') == ("Explicit threat.", True)
    assert string_value('He said \\"go\\" twice" tail') == ('He said "go" twice', True)
    assert string_value("cut short by the token bou") == ("cut short by the token bou", False)
    assert string_value("ends inside an escape \\") == ("ends inside an escape \\", False)


# ---- answers from a model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Served:
    tokenizer = build_byte_tokenizer()
    tiny = TinyModel(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    model = build_tiny_model(tiny, tokenizer, seed=0).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a fresh init answers the same whatever the text: make texts matter
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    labels = load_labels(REPO / "configs/labels.yaml")
    config = RunConfig()
    chosen = Chosen("r1", 5, Path("runs/r1/checkpoint-5"), "a" * 64, "approved", False, config)
    widest = max(len(tokenizer(o)["input_ids"]) for o in answer_options(labels))
    ref = CheckpointRef(run_id="r1", step=5, sha256="a" * 64)
    return Served(model, tokenizer, labels, "Classify.", 96, ref, chosen, prompt_token_limit(widest, 96))


def test_answers_are_the_evaluation_probabilities_and_decisions(served: Served) -> None:
    jobs = [Job(("first text", "second, longer text"), {"channel": "chat"}, False), Job(("third",), {}, True)]
    answers = answer_jobs(served, jobs, rationale_tokens=8)
    assert [len(a) for a in answers] == [2, 1]
    prompts = prompts_of(served, jobs[0]) + prompts_of(served, jobs[1])
    assert "channel: chat" in prompts[0] and "channel" not in prompts[2]
    expected = label_probabilities(served.model, served.tokenizer, prompts, served.labels, batch_size=1, max_length=96)
    flat = answers[0] + answers[1]
    names = [*served.labels.names, "null"]
    got = np.array([[a.probabilities[n] for n in names] for a in flat])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [a.decision for a in flat] == decide(expected, served.labels)
    assert all(a.abstain == (a.decision is None) for a in flat)
    assert [a.rationale is None for a in flat] == [True, True, False]  # only the job that asked for one
    assert all(a.checkpoint.step == 5 for a in flat)


def test_rationale_generation_is_bounded_and_batched_like_one_at_a_time(served: Served) -> None:
    prefixes = ["x" * 5 + '", "rationale": "', "a longer prefix here" + '", "rationale": "']
    together = generate_rationales(served.model, served.tokenizer, prefixes, max_new_tokens=6)
    alone = [generate_rationales(served.model, served.tokenizer, [p], max_new_tokens=6)[0] for p in prefixes]
    assert together == alone
    assert all(len(r) <= 6 for r in together)


def test_a_text_longer_than_the_model_reads_is_found(served: Served) -> None:
    assert too_long(served, Job(("short",), {})) is None
    where, tokens = too_long(served, Job(("short", "y" * 200), {})) or (-1, 0)
    assert where == 1 and tokens > served.prompt_limit
    assert len(answer_options(served.labels)) == len(served.labels.names) + 1


def test_a_checkpoint_whose_files_changed_after_saving_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    sha, _ = fingerprint(folder)
    chosen = Chosen("r1", 5, folder, sha, "approved", False, RunConfig(), event_id="r1.1.9")
    verify(chosen)  # as saved: fine
    (folder / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(Refused) as changed:
        verify(chosen)
    now = fingerprint(folder)[0]
    assert str(changed.value) == (
        f"{folder}: its files hash to sha256 {now[:12]}…, but its checkpoint event r1.1.9 announced {sha[:12]}…: "
        "the files changed after the trainer saved them"
    )
    with pytest.raises(NotFound, match="does not exist"):
        verify(Chosen("r1", 6, tmp_path / "gone", sha, "approved", False, RunConfig()))


def test_request_and_reply_json_schemas_are_exported(served: Served) -> None:
    schemas = json_schemas()
    jsonschema.validate(
        {"texts": ["a", "b"], "metadata": {"channel": "chat"}, "rationale": False}, schemas["predict-request.json"]
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"text": "a", "colour": "red"}, schemas["predict-request.json"])
    reply = answer_jobs(served, [Job(("x",), {}, False)], rationale_tokens=4)[0]
    jsonschema.validate({"answers": [a.model_dump(mode="json") for a in reply]}, schemas["predict-reply.json"])
    assert "event.predictor.loaded.json" in schemas


# ---- trainbus up, the exporter -----------------------------------------------------------


def test_trainbus_up_serves_only_when_the_predictor_config_names_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs/predict.yaml"
    config.write_text("serve:\n  run: null\n")
    assert service() == []
    assert "predict" not in service_commands()  # off: `trainbus up` starts nothing for it
    config.write_text("serve:\n  run: my-run\n  alias: risk\n")
    argv = service()
    assert argv == [sys.executable, "-m", "runtime.cli", "serve", "--config", str(config.resolve())]
    assert service_commands()["predict"] == argv


def test_the_exporter_shows_what_each_alias_serves() -> None:
    state = ExporterState()
    for n, (alias, step) in enumerate([("risk", 20), ("risk", 40), ("canary", 20)], start=1):
        event = PredictorLoaded(
            event_id=f"r1.predictor.i.{n}",
            run_id="r1",
            seq=n,
            source="predictor",
            alias=alias,
            subject=f"trainbus.predict.{alias}",
            step=step,
            checkpoint_path=f"runs/r1/checkpoint-{step}",
            sha256="b" * 64,
            verdict="approved",
            instance="i",
        )
        handle(event, state)
    text = generate_latest(build_registry(RunCollector(state, threading.Lock(), expire_after=600))).decode()
    assert 'trainbus_predictor_checkpoint_step{alias="risk",run_id="r1"} 40.0' in text
    assert 'trainbus_predictor_checkpoint_step{alias="canary",run_id="r1"} 20.0' in text
    assert 'trainbus_events_total{run_id="r1",type="predictor.loaded"} 3.0' in text


def test_a_deleted_or_unreadable_best_pointer_points_nowhere() -> None:
    for value in (None, b"", b"not json", b"[1, 2]", b'{"step": 5}'):
        assert parse_best(value) is None, value  # the service keeps what it serves
    assert parse_best(b'{"checkpoint_event_id": "r.1.9", "step": 9}') == {"checkpoint_event_id": "r.1.9", "step": 9}
