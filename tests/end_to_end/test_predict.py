"""The predictor against a real nats-server, a real audit gate and a checkpoint of a real tiny run.

One run is trained once for the whole file (40 steps, a checkpoint every 20, both judged by
`trainbus audit` with permissive rules) and one `trainbus serve` answers for it; every test
here uses them. Serving equals evaluation, hot swap under load, replicas, bad input, the merged
export, refusals and roles.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS
from peft import PeftModel
from streamlit.testing.v1 import AppTest

from consumers.audit.loop import open_checkpoints
from consumers.predict.checkpoints import Refused, best_key, choose
from consumers.predict.client import SERVICE_NAME, predict, served_aliases
from dashboards.app import connection
from dashboards.app.predictions import PREDICT_TIMEOUT
from dashboards.app.reader import BusReader
from dashboards.app.views.tryit import ALIAS as TRY_IT_ALIAS
from dashboards.app.views.tryit import ASKED
from dashboards.app.views.tryit import METADATA as TRY_IT_METADATA
from producers.config import RunConfig
from producers.task.data import read_examples
from producers.task.evaluation import classifier_prompt, label_probabilities
from producers.task.labels import load_labels
from producers.task.metrics import classification_metrics
from producers.task.model import load_model_and_tokenizer
from runtime.bus.server import RunningServer
from runtime.bus.stream import ensure_stream, replay
from runtime.checkpoints import fingerprint
from runtime.errors import NotFound
from runtime.settings import StreamSettings
from schemas import AuditVerdict, Checkpoint, Evaluation, RunStarted, TrainStep, event_subject, run_events
from schemas.predict import Answer, PredictorLoaded
from schemas.subjects import CHECKPOINTS_BUCKET, predict_subject
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, of_type, start_trainer, trainbus_env, wait_events
from tests.integration.test_dashboard_app import charts as dashboard_charts
from tests.integration.test_dashboard_app import page as dashboard_page
from tests.integration.test_dashboard_app import texts as dashboard_texts
from tests.integration.test_roles import eventually, login

RUN = "predict-run"
ALIAS = "risk"
LABELS = REPO / "configs/labels.yaml"
EVAL_SAMPLES = 32
RULES = f"""labels_file: {LABELS}
evaluate_missing: false
best_metric: accuracy
best_mode: max
rules:
  non_finite: {{severity: critical, actions: [flag, reject_checkpoint]}}
"""
TEXTS = ["I am going to hurt him tomorrow.", "The printer on floor two is jammed again.", "Nice weather today."]


class Process:
    """A `trainbus` subprocess whose stdout lines are collected as they come."""

    def __init__(self, url: str, *argv: str, log: Path, **env: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", *argv],
            cwd=REPO, env=trainbus_env(url, **env), stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, fragment: str, count: int = 1, timeout: float = 120) -> str:
        """The ``count``-th stdout line containing ``fragment``; fails with the stderr tail."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines if fragment in line]
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-3000:]
                pytest.fail(f"no line with {fragment!r} (exit {self.proc.poll()}): {self.lines} {tail}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def cli(url: str, *argv: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *argv],
        cwd=REPO, env=trainbus_env(url, **env), input=stdin, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


async def until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def stored(nc: NATS, run_id: str, event_type: str) -> list[Any]:
    return [d.event async for d in replay(nc.jetstream(), event_subject(run_id, event_type)) if d.event is not None]


async def best_entry(nc: NATS) -> dict[str, Any]:
    kv = await nc.jetstream().key_value(CHECKPOINTS_BUCKET)
    return dict(json.loads((await kv.get(best_key(RUN))).value))


async def point_best(nc: NATS, step: int) -> None:
    """Move the run's best pointer to the approved checkpoint at ``step``, as the audit gate does."""
    kv = await nc.jetstream().key_value(CHECKPOINTS_BUCKET)
    entry = json.loads((await kv.get(f"{RUN}.{step}")).value)
    await kv.put(best_key(RUN), json.dumps({**entry, "key": f"{RUN}.{step}"}).encode())


async def connected(url: str) -> NATS:
    nc = NATS()
    await nc.connect(url)
    return nc


def probabilities(answers: list[Answer], names: list[str]) -> np.ndarray:
    return np.array([[a.probabilities[n] for n in names] for a in answers])


# ---- the run and the service -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The tiny default trained 40 steps, checkpoints at 20 and 40, both approved by the real audit gate."""
    tmp = tmp_path_factory.mktemp("predict")
    rules = tmp / "audit.yaml"
    rules.write_text(RULES)
    audit = Process(nats_server.url, "audit", "--run", RUN, "--rules", str(rules), log=tmp / "audit.log")
    try:
        audit.wait_for("trainbus audit: watching")
        trainer = start_trainer(
            nats_server.url, "configs/tiny.yaml", RUN, tmp,
            "training.max_steps=40", "training.save_steps=20", "training.eval_steps=20", "training.warmup_steps=0",
            "training.logging_steps=10", f"data.max_eval_samples={EVAL_SAMPLES}",
        )  # fmt: skip
        assert trainer.wait(timeout=300) == 0, trainer.output()[-3000:]
        events = wait_events(
            nats_server.url, RUN, lambda ev: len(of_type(ev, "audit.verdict")) == len(of_type(ev, "checkpoint")) == 2
        )
    finally:
        audit.stop()
    assert [v.verdict for v in of_type(events, "audit.verdict")] == ["approved", "approved"]
    yield {"url": nats_server.url, "tmp": tmp, "run_dir": tmp / "runs" / RUN, "events": events, "rules": rules}


@pytest.fixture(scope="module")
def service(trained: dict[str, Any]) -> Iterator[Process]:
    """`trainbus serve --run predict-run --alias risk`, following the run's best checkpoint."""
    serve = Process(trained["url"], "serve", "--run", RUN, "--alias", ALIAS, log=trained["tmp"] / "serve.log")
    try:
        serve.wait_for(f"serving run {RUN} step")
        yield serve
    finally:
        assert serve.stop() == 0, serve.log.read_text()[-2000:]
    assert "0 failed" in serve.lines[-1]  # the shutdown summary: no request failed all along


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- serving is evaluation ---------------------------------------------------------------


async def test_answers_equal_in_process_evaluation(trained: dict[str, Any], service: Process, one_thread: None) -> None:
    nc = await connected(trained["url"])
    try:
        best = await best_entry(nc)
        labels = load_labels(LABELS)
        examples = read_examples(trained["tmp"] / "data/validation.jsonl", labels)[0][:EVAL_SAMPLES]
        replies = await asyncio.gather(
            *(predict(nc, ALIAS, [ex.text], metadata=ex.metadata, rationale=False) for ex in examples)
        )
        started: list[RunStarted] = await stored(nc, RUN, "run.started")
        evals: list[Evaluation] = await stored(nc, RUN, "eval")
    finally:
        await nc.close()
    answers = [reply[0] for reply in replies]
    assert {(a.checkpoint.run_id, a.checkpoint.step, a.checkpoint.sha256) for a in answers} == {
        (RUN, best["step"], best["sha256"])
    }
    names = [*labels.names, "null"]
    served = probabilities(answers, names)
    # the trainer's evaluation, in this process: base model + unmerged adapter, the same scoring function
    config = RunConfig.model_validate(started[0].config)
    model, tokenizer = load_model_and_tokenizer(config.model, str(trained["run_dir"] / "base-model"))
    model = PeftModel.from_pretrained(model, best["path"]).eval()
    prompts = [classifier_prompt(ex, config.data.system_prompt) for ex in examples]
    expected = label_probabilities(model, tokenizer, prompts, labels, batch_size=8, max_length=config.data.max_length)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # and the answers reproduce what the run's own eval event reported for that checkpoint
    event = next(e for e in evals if e.step == best["step"])
    metrics = classification_metrics(served, [ex.label for ex in examples], labels)
    assert metrics["num_samples"] == event.num_samples == EVAL_SAMPLES
    for name in ("accuracy", "macro_f1", "abstain_rate", "critical_error_cost"):
        assert metrics[name] == pytest.approx(getattr(event, name), abs=1e-9), name
    assert [a.abstain for a in answers] == [a.decision is None for a in answers]


async def test_the_service_is_discoverable_and_each_load_is_an_event(trained: dict[str, Any], service: Process) -> None:
    nc = await connected(trained["url"])
    try:
        best = await best_entry(nc)
        served = {a.alias: a for a in await served_aliases(nc, wait=3.0)}
        ping = json.loads((await nc.request(f"$SRV.PING.{SERVICE_NAME}", b"", timeout=10)).data)
        info = json.loads((await nc.request(f"$SRV.INFO.{SERVICE_NAME}", b"", timeout=10)).data)
        loaded: list[PredictorLoaded] = await stored(nc, RUN, "predictor.loaded")
        started: list[RunStarted] = await stored(nc, RUN, "run.started")
    finally:
        await nc.close()
    # what the model was trained with: the sample data's metadata key and every value seen, said three ways
    seen = {"channel": ["chat", "email", "forum"]}
    assert started[0].metadata_seen == seen
    endpoint = next(e for e in info["endpoints"] if e["subject"] == predict_subject(ALIAS))
    assert json.loads(endpoint["metadata"]["metadata_seen"]) == seen and served[ALIAS].metadata_seen == seen
    assert all(e.metadata_seen == seen for e in loaded)
    assert served[ALIAS].run_id == RUN and served[ALIAS].subject == predict_subject(ALIAS)
    assert best["step"] in served[ALIAS].steps
    assert ping["name"] == SERVICE_NAME
    first = next(e for e in loaded if e.alias == ALIAS)
    assert (first.step, first.sha256, first.verdict, first.trigger) == (
        best["step"],
        best["sha256"],
        "approved",
        "start",
    )
    assert first.source == "predictor" and first.instance in served[ALIAS].replicas


BAD_INPUT = [
    (b"this is not json", "400", "not JSON"),
    (b'{"text": ""}', "400", "text: must not be empty"),
    (b'{"texts": ["fine", " "]}', "400", "texts.1: must not be empty"),
    (b'{"text": "hello", "temperature": 0.5}', "400", "temperature: unknown field"),
    (b'{"texts": []}', "400", "texts: List should have at least 1 item"),
    (json.dumps({"text": "x" * 1000}).encode(), "413", "text: "),
    (json.dumps({"texts": ["ok", "y" * 1000]}).encode(), "413", "texts.1: "),
]


async def test_each_bad_input_gets_a_code_and_one_line_and_the_service_keeps_serving(
    trained: dict[str, Any], service: Process
) -> None:
    nc = await connected(trained["url"])
    try:
        for payload, code, fragment in BAD_INPUT:
            msg = await nc.request(predict_subject(ALIAS), payload, timeout=30)
            headers = msg.headers or {}
            assert headers.get("Nats-Service-Error-Code") == code, (payload[:40], headers)
            assert headers["Nats-Service-Error"].startswith(fragment)
            assert "\n" not in headers["Nats-Service-Error"]
        answers = await predict(nc, ALIAS, TEXTS, rationale=True)
    finally:
        await nc.close()
    assert len(answers) == len(TEXTS) and all(a.rationale is not None for a in answers)


def test_predict_cli_table_json_stdin_and_exit_codes(trained: dict[str, Any], service: Process) -> None:
    url = trained["url"]
    table = cli(url, "predict", "--alias", ALIAS, "--no-rationale", *TEXTS[:2])
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["TEXT", "DECISION", "P", "STEP", "RATIONALE"]
    piped = cli(url, "predict", "--alias", ALIAS, "--json", "-", stdin="\n".join(TEXTS) + "\n")
    assert piped.returncode == 0, piped.stderr
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS and all("probabilities" in r for r in rows)
    too_long = cli(url, "predict", "--alias", ALIAS, "z" * 1000)
    assert too_long.returncode == 2 and "413: texts.0:" in too_long.stderr and "Traceback" not in too_long.stderr
    nobody = cli(url, "predict", "--alias", "nobody-serves-this", "hello")
    assert nobody.returncode == 3 and "no predictor serves 'nobody-serves-this'" in nobody.stderr


def test_predict_metadata_reaches_the_prompt(trained: dict[str, Any], service: Process) -> None:
    """`trainbus predict --metadata channel=chat` asks as the client does with that metadata: the
    channel line is in the prompt (the answer differs from the text alone's)."""
    url = trained["url"]
    asked = cli(url, "predict", "--alias", ALIAS, "--json", "--no-rationale", "--metadata", "channel=chat", TEXTS[0])
    alone = cli(url, "predict", "--alias", ALIAS, "--json", "--no-rationale", TEXTS[0])
    assert asked.returncode == alone.returncode == 0, asked.stderr + alone.stderr

    async def ask() -> Answer:
        nc = await connected(url)
        try:
            return (await predict(nc, ALIAS, [TEXTS[0]], metadata={"channel": "chat"}, rationale=False))[0]
        finally:
            await nc.close()

    expected = asyncio.run(ask())
    with_metadata, text_alone = json.loads(asked.stdout)["probabilities"], json.loads(alone.stdout)["probabilities"]
    assert with_metadata == pytest.approx(expected.probabilities, abs=1e-6)
    assert with_metadata != pytest.approx(text_alone, abs=1e-6)
    bad = cli(url, "predict", "--alias", ALIAS, "--metadata", "channel=[1]", TEXTS[0])
    assert bad.returncode == 2 and "--metadata 'channel=[1]'" in bad.stderr and "Traceback" not in bad.stderr


# ---- hot swap and replicas ---------------------------------------------------------------


async def test_hot_swap_while_clients_send_fails_no_request(trained: dict[str, Any], service: Process) -> None:
    nc = await connected(trained["url"])
    steps: list[int] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(k: int) -> None:
        while not stop.is_set():
            try:
                answers = await predict(nc, ALIAS, [TEXTS[k % len(TEXTS)]], rationale=False, timeout=60)
            except Exception as exc:  # any failure is what this test is about
                errors.append(repr(exc))
            else:
                steps.append(answers[0].checkpoint.step)

    try:
        before = (await best_entry(nc))["step"]
        other = 20 if before == 40 else 40
        clients = [asyncio.ensure_future(client(k)) for k in range(4)]
        await until(lambda: len(steps) >= 10, what="answers before the swap")
        await point_best(nc, other)
        await until(lambda: steps[-1] == other, what=f"answers from step {other}")
        swapped = len(steps)
        await until(lambda: len(steps) >= swapped + 10, what="answers after the swap")
        await point_best(nc, before)
        await until(lambda: steps[-1] == before, what=f"answers from step {before} again")
        # a pointer to a checkpoint nothing vouches for is not loaded: the service goes on with what it has
        kv = await nc.jetstream().key_value(CHECKPOINTS_BUCKET)
        await kv.put(
            best_key(RUN), json.dumps({**(await best_entry(nc)), "checkpoint_event_id": "no-such-event"}).encode()
        )
        await asyncio.to_thread(service.wait_for, "not loading the new best checkpoint")
        settled = len(steps)
        await until(lambda: len(steps) >= settled + 10, what="answers after the refused pointer")
        await point_best(nc, before)  # as it was, for the tests after this one
        stop.set()
        await asyncio.gather(*clients)
        loaded: list[PredictorLoaded] = await stored(nc, RUN, "predictor.loaded")
    finally:
        stop.set()
        await nc.close()
    assert errors == []
    assert "no checkpoint event no-such-event" in next(x for x in service.lines if "not loading" in x)
    runs = [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s]
    assert runs == [before, other, before]  # every answer before a swap from the old model, after it from the new
    swaps = [e for e in loaded if e.trigger == "hot_swap"]
    assert [e.step for e in swaps][-2:] == [other, before] and swaps[-1].previous_step == other


async def test_two_replicas_both_answer(trained: dict[str, Any], service: Process) -> None:
    second = Process(trained["url"], "serve", "--run", RUN, "--alias", ALIAS, log=trained["tmp"] / "serve-2.log")
    nc = await connected(trained["url"])
    try:
        await asyncio.to_thread(second.wait_for, f"serving run {RUN} step")
        before = await _requests_by_instance(nc, replicas=2)
        await asyncio.gather(*(predict(nc, ALIAS, [TEXTS[i % 3]], rationale=False) for i in range(40)))
        after = await _requests_by_instance(nc, replicas=2)
        loaded: list[PredictorLoaded] = await stored(nc, RUN, "predictor.loaded")
    finally:
        await nc.close()
        assert second.stop() == 0
    assert len(after) == 2
    assert [e.seq for e in loaded] == list(range(1, len(loaded) + 1))  # one numbering, whichever replica announced
    assert {e.instance for e in loaded} == set(after)
    served_each = {instance: after[instance] - before.get(instance, 0) for instance in after}
    assert sum(served_each.values()) == 40
    assert all(n > 0 for n in served_each.values()), served_each  # the queue group spread the load


async def _requests_by_instance(nc: NATS, *, replicas: int) -> dict[str, int]:
    """Answered requests of every replica serving ``ALIAS``, from ``$SRV.STATS`` (every instance answers)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{SERVICE_NAME}", b"", reply=inbox)
    found: dict[str, int] = {}
    try:
        while len(found) < replicas:
            msg = await sub.next_msg(timeout=30)
            stats = json.loads(msg.data)
            ok = [
                e["num_requests"] - e["num_errors"]
                for e in stats["endpoints"]
                if e["subject"] == predict_subject(ALIAS)
            ]
            if ok:  # a predictor of another test's run on the session's bus answers too: not one of ours
                found[stats["id"]] = sum(ok)
    finally:
        await sub.unsubscribe()
    return found


# ---- the merged export -------------------------------------------------------------------

PLAIN_TRANSFORMERS = """
import json, sys
for name in ("peft", "producers", "consumers", "runtime", "schemas"):
    sys.modules[name] = None  # the export must load without peft and without trainbus
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out, texts = sys.argv[1], json.loads(sys.argv[2])
info = json.load(open(out + "/trainbus-export.json"))
tokenizer = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out).eval()
rows = []
for text in texts:
    prompt = info["system_prompt"].strip() + "\\nText: " + text + "\\nAnswer: " + '{"decision": '
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for option in info["options"]:
        tokens = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids + tokens])).logits[0].double(), -1)
        scores.append(sum(logprobs[len(ids) + k - 1, t].item() for k, t in enumerate(tokens)))
    rows.append(torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist())
print(json.dumps({"labels": info["labels"], "step": info["step"], "probabilities": rows}))
"""


def test_merged_export_loads_with_plain_transformers_and_equals_the_service(
    trained: dict[str, Any], service: Process, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    exported = cli(trained["url"], "export", "--run", RUN, "--merge", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "Warning" not in exported.stderr and "Loading weights" not in exported.stderr  # quiet
    again = cli(trained["url"], "export", "--run", RUN, "--merge", str(out))
    assert again.returncode == 2 and "not an empty folder" in again.stderr  # nothing is overwritten
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), json.dumps(TEXTS)],
        cwd=tmp_path, env=trainbus_env(trained["url"]), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    result = json.loads(plain.stdout)

    async def ask() -> tuple[dict[str, Any], list[Answer]]:
        nc = await connected(trained["url"])
        try:
            return await best_entry(nc), await predict(nc, ALIAS, TEXTS, rationale=False)
        finally:
            await nc.close()

    best, answers = asyncio.run(ask())
    assert result["step"] == best["step"] == answers[0].checkpoint.step
    served = probabilities(answers, [*result["labels"], "null"])
    np.testing.assert_allclose(np.array(result["probabilities"]), served, atol=1e-5)


# ---- refusals ----------------------------------------------------------------------------

REJECTED = "predict-rejected"


async def test_a_rejected_or_unjudged_checkpoint_is_refused_unless_forced(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """A run whose NaN loss made the real audit gate reject its checkpoint: serve and export refuse it."""
    url = trained["url"]
    run_dir = tmp_path / "runs" / REJECTED
    shutil.copytree(trained["run_dir"] / "base-model", run_dir / "base-model")
    for step in (2, 3):
        shutil.copytree(trained["run_dir"] / "checkpoint-20", run_dir / f"checkpoint-{step}")
    nc = await connected(url)
    try:
        started: RunStarted = (await stored(nc, RUN, "run.started"))[0]
        js = nc.jetstream()
        # what a trainer whose loss diverged publishes, then the audit gate judges it
        await _publish(js, started.model_copy(update={"event_id": f"{REJECTED}.1.1", "run_id": REJECTED}))
        await _publish(js, TrainStep(event_id=f"{REJECTED}.1.2", run_id=REJECTED, seq=2, step=1, epoch=0.1, loss=float("nan"), learning_rate=1e-3))  # fmt: skip
        await _publish(js, _checkpoint(run_dir, 2, seq=3))
        audit = Process(url, "audit", "--run", REJECTED, "--rules", str(trained["rules"]), log=tmp_path / "audit.log")
        try:
            await asyncio.to_thread(audit.wait_for, "trainbus audit: watching")
            deadline = time.monotonic() + 60
            verdicts: list[AuditVerdict] = []
            while not (verdicts := await stored(nc, REJECTED, "audit.verdict")):
                assert time.monotonic() < deadline, "the audit gate judged nothing in 60 s"
                await asyncio.sleep(0.2)
        finally:
            audit.stop()
        assert verdicts[0].verdict == "rejected" and "non_finite" in verdicts[0].reasons[0]
        await _publish(js, _checkpoint(run_dir, 3, seq=4))  # saved after the audit gate stopped: never judged
        with pytest.raises(Refused, match="has not judged it"):
            await choose(js, REJECTED, step=3)
        forced = await choose(js, REJECTED, step=2, force=True)
        assert (forced.verdict, forced.forced) == ("rejected", True)
        with pytest.raises(Refused, match="is rejected"):  # --checkpoint PATH finds the same event
            await choose(js, REJECTED, path=str(run_dir / "checkpoint-2"))
        loose = shutil.copytree(run_dir / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-7")
        with pytest.raises(NotFound, match=r"no checkpoint .*checkpoint-7 in the stream"):
            await choose(js, REJECTED, path=str(loose))
        unvouched = await choose(js, REJECTED, path=str(loose), force=True)  # --force: served as is
        assert (unvouched.step, unvouched.verdict, unvouched.sha256) == (7, "pending", fingerprint(loose)[0])
    finally:
        await nc.close()
    for argv in (["serve", "--run", REJECTED, "--step", "2"], ["export", "--run", REJECTED, "--step", "2", "--merge", str(tmp_path / "out")]):  # fmt: skip
        refused = await asyncio.to_thread(cli, url, *argv)
        assert refused.returncode == 2, refused.stderr
        assert "step 2) is rejected: the audit gate rejected it; --force" in refused.stderr
        assert "Traceback" not in refused.stderr
    unjudged = await asyncio.to_thread(cli, url, "serve", "--run", REJECTED, "--step", "3")
    assert unjudged.returncode == 2 and "has not judged it" in unjudged.stderr
    no_best = await asyncio.to_thread(cli, url, "export", "--run", REJECTED, "--merge", str(tmp_path / "out"))
    assert no_best.returncode == 2 and "no best approved checkpoint" in no_best.stderr


async def _publish(js: Any, event: Any) -> None:
    await js.publish(event_subject(event.run_id, event.type), event.model_dump_json().encode())


def _checkpoint(run_dir: Path, step: int, *, seq: int) -> Checkpoint:
    folder = run_dir / f"checkpoint-{step}"
    sha, size = fingerprint(folder)
    return Checkpoint(
        event_id=f"{REJECTED}.1.{seq}",
        run_id=REJECTED,
        seq=seq,
        step=step,
        path=str(folder),
        sha256=sha,
        size_bytes=size,
    )


# ---- roles -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_service(
    trained: dict[str, Any], secured_server: RunningServer, role_passwords: dict[str, str]
) -> Iterator[Process]:
    """`trainbus serve --alias secure` as the predictor role on the secured server, the run copied there."""
    asyncio.run(_copy_run(trained["url"], secured_server, role_passwords["admin"]))
    creds = {"NATS_USER": "predictor", "NATS_PASSWORD": role_passwords["predictor"]}
    serve = Process(
        secured_server.url, "serve", "--run", RUN, "--alias", "secure", log=trained["tmp"] / "serve-secure.log", **creds
    )
    try:
        serve.wait_for(f"serving run {RUN} step")  # read the stream and the bucket, announced, registered
        yield serve
    finally:
        assert serve.stop() == 0


def test_roles_predictor_serves_viewer_and_operator_call_trainer_cannot(
    secured_server: RunningServer, role_passwords: dict[str, str], secure_service: Process
) -> None:
    url = secured_server.url
    creds = {role: {"NATS_USER": role, "NATS_PASSWORD": role_passwords[role]} for role in role_passwords}
    for role in ("viewer", "operator"):
        asked = cli(url, "predict", "--alias", "secure", "--json", "--no-rationale", TEXTS[0], **creds[role])
        assert asked.returncode == 0, (role, asked.stderr)
        assert json.loads(asked.stdout)["checkpoint"]["run_id"] == RUN
    listed = cli(url, "predict", "--list", **creds["viewer"])
    assert listed.returncode == 0 and "secure" in listed.stdout
    denied = cli(url, "predict", "--alias", "secure", "--timeout", "2", TEXTS[0], **creds["trainer"])
    assert denied.returncode == 3 and "denied" in denied.stderr
    asyncio.run(_predictor_may_not_steer_or_fake_events(secured_server, role_passwords["predictor"]))
    loaded = asyncio.run(_loaded_on(secured_server, role_passwords["admin"]))
    assert [e.alias for e in loaded] == ["secure"]


async def _copy_run(source_url: str, secured: RunningServer, admin_password: str) -> None:
    """The run's events and best pointer, as they would be on a secured bus."""
    source = await connected(source_url)
    target = await login(secured, "admin", admin_password)
    try:
        js = target.jetstream()
        await ensure_stream(js, StreamSettings())
        async for item in replay(source.jetstream(), run_events(RUN)):
            if item.event is not None and item.event.type != "predictor.loaded":
                await js.publish(item.subject, item.data)
        kv = await open_checkpoints(js)  # as the audit gate creates it (other files' audit gates may have)
        entry = await (await source.jetstream().key_value(CHECKPOINTS_BUCKET)).get(best_key(RUN))
        await kv.put(best_key(RUN), entry.value or b"")
    finally:
        await source.close()
        await target.close()


async def _predictor_may_not_steer_or_fake_events(secured: RunningServer, password: str) -> None:
    errors: list[str] = []
    nc = await login(secured, "predictor", password, errors)
    try:
        await nc.publish(f"trainbus.control.{RUN}", b"{}")
        await nc.publish(event_subject(RUN, "train.step"), b"{}")
        await nc.flush()
        assert await eventually(lambda: len(errors) >= 2)
    finally:
        await nc.close()
    assert all("permissions violation" in e.lower() for e in errors)


async def _loaded_on(secured: RunningServer, admin_password: str) -> list[PredictorLoaded]:
    nc = await login(secured, "admin", admin_password)
    try:
        return await stored(nc, RUN, "predictor.loaded")
    finally:
        await nc.close()


# ---- the dashboard's Try-it page ---------------------------------------------------------


@pytest.fixture
def dashboard_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., BusReader]]:
    """The dashboard's shared bus reader on a server, as a user (``(url, user, password)``)."""

    def start(url: str, user: str | None = None, password: str = "") -> BusReader:
        monkeypatch.setenv("NATS_URL", url)
        if user is not None:
            monkeypatch.setenv("NATS_USER", user)
            monkeypatch.setenv("NATS_PASSWORD", password)
        reader = connection._shared_reader(url, user)
        wait_until(lambda: reader.overview().bus.caught_up, timeout=60, what="the dashboard to replay the stream")
        return reader

    yield start
    connection._shared_reader.clear()  # closes the readers


def served(at: AppTest, alias: str) -> str | None:
    """The picker's line for ``alias`` (``risk — run R, step 40, 1 replica``), once discovered."""
    return next((o for o in at.selectbox[0].options if o.startswith(f"{alias} — ")), None) if at.selectbox else None


def try_it(text: str, *, alias: str, rationale: bool = True, metadata: dict[str, str] | None = None) -> AppTest:
    """A Try-it session that picked ``alias`` once discovered (and ``metadata``), sent ``text`` and got the reply."""
    at = dashboard_page("views/tryit.py")
    wait_until(lambda: at.run() and served(at, alias), timeout=30, what=f"{alias} among the served models")
    at.selectbox(key=TRY_IT_ALIAS).select(alias)
    at.run()
    for key, value in (metadata or {}).items():
        at.selectbox(key=TRY_IT_METADATA + key).select(value)
    at.text_area(key="tryit-text").input(text)
    at.checkbox[0].set_value(rationale)
    next(b for b in at.button if b.label == "Predict").click().run()
    asked = at.session_state[ASKED]
    wait_until(lambda: asked.future.done(), timeout=PREDICT_TIMEOUT + 30, what="the answer")
    at.run()
    assert not at.exception, at.exception
    return at


def test_try_it_page_shows_the_served_checkpoints_answer(
    trained: dict[str, Any], service: Process, dashboard_on: Callable[..., BusReader]
) -> None:
    reader = dashboard_on(trained["url"])
    at = try_it(TEXTS[0], alias=ALIAS)

    async def expected() -> tuple[dict[str, Any], Answer]:
        nc = await connected(trained["url"])
        try:
            return await best_entry(nc), (await predict(nc, ALIAS, [TEXTS[0]], rationale=False))[0]
        finally:
            await nc.close()

    best, answer = asyncio.run(expected())
    assert served(at, ALIAS) == f"{ALIAS} — run {RUN}, step {best['step']}, 1 replica"
    shown = {m.label: m.value for m in at.metric}
    assert shown["decision"] == (answer.decision or "abstain") and shown["checkpoint"] == f"step {best['step']}"
    chart, _ = dashboard_charts(at)["probability per label"]
    assert dict(zip(chart["label"], chart["probability"], strict=True)) == pytest.approx(
        {("abstain (null)" if k == "null" else k): p for k, p in answer.probabilities.items()}, abs=1e-6
    )
    assert chart[chart["decision"]]["label"].tolist() == [answer.decision or "abstain (null)"]
    rationale = at.session_state[ASKED].future.result()[0].rationale
    assert rationale is not None and rationale in dashboard_texts(at.text)
    caption = next(c for c in dashboard_texts(at.caption) if c.startswith("Answered by run"))
    assert f"`{RUN}`, checkpoint step {best['step']}, sha256 `{best['sha256'][:16]}" in caption
    assert f"approved checkpoint, served as {ALIAS} since" in caption  # from its predictor.loaded event
    assert reader.run(RUN) is not None

    refused = try_it("x" * 1000, alias=ALIAS, rationale=False)  # longer than the model reads
    assert any(e.startswith(f"{ALIAS} refused the text (413): texts.0:") for e in dashboard_texts(refused.error))
    assert not refused.metric
    again = try_it(TEXTS[1], alias=ALIAS, rationale=False)  # and it still serves
    assert {m.label for m in again.metric} >= {"decision", "checkpoint"} and not again.error


def test_try_it_page_offers_the_metadata_the_model_was_trained_with(
    trained: dict[str, Any], service: Process, dashboard_on: Callable[..., BusReader]
) -> None:
    dashboard_on(trained["url"])
    at = try_it(TEXTS[0], alias=ALIAS, rationale=False, metadata={"channel": "email"})
    assert at.selectbox(key=TRY_IT_METADATA + "channel").options == ["(none)", "chat", "email", "forum"]
    assert any("with metadata channel=email" in c for c in dashboard_texts(at.caption))

    async def expected() -> Answer:
        nc = await connected(trained["url"])
        try:
            return (await predict(nc, ALIAS, [TEXTS[0]], metadata={"channel": "email"}, rationale=False))[0]
        finally:
            await nc.close()

    answer = at.session_state[ASKED].future.result()[0]
    assert answer.probabilities == pytest.approx(asyncio.run(expected()).probabilities, abs=1e-6)
    alone = try_it(TEXTS[0], alias=ALIAS, rationale=False)  # left empty: the text alone
    assert any("with the text alone" in c for c in dashboard_texts(alone.caption))


def test_try_it_page_for_the_viewer_and_operator_roles_not_the_trainer(
    secured_server: RunningServer,
    role_passwords: dict[str, str],
    secure_service: Process,
    dashboard_on: Callable[..., BusReader],
) -> None:
    for role in ("viewer", "operator"):
        reader = dashboard_on(secured_server.url, role, role_passwords[role])
        at = try_it(TEXTS[0], alias="secure", rationale=False)
        assert {m.label: m.value for m in at.metric}["checkpoint"].startswith("step ") and not at.error, role
        # the role may watch the checkpoints bucket: the audit gate's best pointer (★) reaches its dashboard
        wait_until(lambda r=reader: RUN in r.overview().best_runs, timeout=30, what=f"the best pointer for {role}")
        connection._shared_reader.clear()
    dashboard_on(secured_server.url, "trainer", role_passwords["trainer"])
    at = dashboard_page("views/tryit.py")
    wait_until(lambda: at.run() and at.error, timeout=30, what="the trainer's discovery to be refused")
    assert dashboard_texts(at.error)[0].startswith("The server does not let trainer look for predictors:")
    assert not at.selectbox
