"""The Try-it page's bookkeeping without a bus: what each way a question can end says, how the
alias list is refreshed, and that the dashboard process never loads the model code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
from typing import Any

from consumers.predict.client import NoService, PredictFailed, ServedAlias
from dashboards.app.denials import Denials, Denied
from dashboards.app.predictions import DISCOVERY_SECONDS, Asked, Discoveries, Discovery, aliases_of, reply_of
from runtime.errors import BusUnavailable, ConfigError
from schemas.predict import Answer
from tests.conftest import REPO

SHA = "0" * 64
ANSWER = Answer(
    decision="HIGH_RISK",
    abstain=False,
    rationale="a threat",
    probabilities={"HIGH_RISK": 0.9, "null": 0.1},
    checkpoint={"run_id": "r1", "step": 40, "sha256": SHA},
)


def _done(result: Any = None, error: Exception | None = None) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def _asked(future: concurrent.futures.Future[Any]) -> Asked:
    return Asked("risk", "some text", True, future)


def test_an_answer_and_every_way_a_question_can_fail_is_one_line() -> None:
    assert reply_of(_asked(concurrent.futures.Future())) is None  # still out
    assert reply_of(_asked(_done([ANSWER]))).answer == ANSWER
    refused = reply_of(_asked(_done(error=PredictFailed("413", "texts.0: 1200 tokens, the model reads 512"))))
    assert refused is not None and refused.kind == "refused"
    assert refused.message == "risk refused the text (413): texts.0: 1200 tokens, the model reads 512"
    nobody = reply_of(
        _asked(_done(error=NoService("no predictor serves 'risk' (nobody answers on trainbus.predict.risk)")))
    )
    assert nobody is not None and nobody.kind == "no_service"
    assert nobody.message.startswith("No predictor serves 'risk'") and "`trainbus serve --run RUN`" in nobody.message
    denied = reply_of(_asked(_done(error=Denied("trainer", "trainbus.predict.risk", "Permissions Violation"))))
    assert denied is not None and denied.kind == "denied"
    assert "denied trainer calling trainbus.predict.risk" in denied.message and "viewer or operator" in denied.message
    for error in (ConfigError("texts.0: must not be empty"), BusUnavailable("not connected to the bus at nats://x")):
        other = reply_of(_asked(_done(error=error)))
        assert other is not None and (other.kind, other.message) == ("error", str(error))


def test_the_alias_list_is_asked_again_and_keeps_the_last_answer_meanwhile() -> None:
    started: list[concurrent.futures.Future[list[ServedAlias]]] = []

    def start(now: float) -> Any:
        def go() -> Discovery:
            started.append(concurrent.futures.Future())
            return Discovery(now, started[-1])

        return go

    found = [ServedAlias("risk", "trainbus.predict.risk", "r1", ["A"], [40])]
    rounds = Discoveries()
    first = rounds.current(start(0.0), 0.0)
    assert aliases_of(first) == (None, "") and len(started) == 1  # looking…
    assert rounds.current(start(1.0), 1.0) is first and len(started) == 1  # one question at a time
    started[0].set_result(found)
    assert rounds.current(start(1.0), 1.0) is first and len(started) == 1  # fresh: not asked again yet
    assert rounds.current(start(DISCOVERY_SECONDS), DISCOVERY_SECONDS) is first and len(started) == 2
    assert aliases_of(rounds.current(start(6.0), 6.0)) == (found, "")  # the next is out: the last list stays
    started[1].set_result([])
    assert aliases_of(rounds.current(start(7.0), 7.0)) == ([], "")  # the predictor went away
    failed = Discovery(0.0, _done(error=Denied("trainer", "$SRV.INFO.trainbus-predict", "Permissions Violation")))
    assert aliases_of(failed) == (None, "The server does not let trainer look for predictors: Permissions Violation.")


def test_the_dashboard_never_imports_the_model_code() -> None:
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts) for path in (REPO / "dashboards/app").rglob("*.py")
    )
    probe = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'producers'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert "dashboards.app.views.tryit" in modules and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_permission_error_names_the_subject_whatever_its_case() -> None:
    async def go() -> str:
        denials = Denials()

        async def never() -> None:
            await asyncio.sleep(60)

        asking = asyncio.ensure_future(denials.guard(never(), ("$SRV.INFO.trainbus-predict",), "trainer"))
        await asyncio.sleep(0)
        denials.on_error("'nats: permissions violation for publish to \"$srv.info.trainbus-predict\"'")
        try:
            await asking
        except Denied as exc:
            return str(exc)
        return "answered"

    said = asyncio.run(go())
    assert said.startswith("the server denied trainer publishing to $SRV.INFO.trainbus-predict (nats: permissions")
