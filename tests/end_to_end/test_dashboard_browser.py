"""The dashboard in a real browser (Debian's chromium, headless, driven by playwright) during a
live tiny training run: the run's name on the Runs page opens its page, the step moves, no metric
tile is cut off, Pause/Resume/Set learning rate/Save/Stop work from the page, the stopped run's
controls turn off with the reason, and the Try-it page answers from the checkpoint saved there
(`trainbus serve --force`).

``TRAINBUS_SCREENSHOT=docs/dashboard-run.png`` also saves the Run page screenshot the README
shows. (``docs/dashboard-tryit.png`` shows the Try-it page of the trained default run instead:
this run is too short to answer the README's example.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from benchmarks.dashboard import Dashboard, browser, start_dashboard
from runtime.bus.server import RunningServer
from schemas import Event
from tests.conftest import REPO, require_tool, wait_until
from tests.end_to_end.conftest import Trainer, of_type, start_trainer, trainbus_env, wait_events

RUN = "browser-run"
PICKER = '[data-testid="stSelectbox"]'


@pytest.fixture(scope="module")
def live(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    """A tiny run that logs every step and goes on until the test stops it from the page."""
    tmp = tmp_path_factory.mktemp("browser")
    trainer = start_trainer(
        nats_server.url, "configs/tiny.yaml", RUN, tmp,
        "training.max_steps=100000", "training.logging_steps=1", "training.warmup_steps=0",
        "training.eval_steps=10", "training.save_steps=null", "publish.heartbeat_seconds=1",
        "data.max_eval_samples=16",
    )  # fmt: skip
    try:
        wait_events(nats_server.url, RUN, lambda ev: of_type(ev, "eval"), timeout=300)
        yield trainer
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()


@pytest.fixture(scope="module")
def dashboard(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    require_tool("chromium")
    started = start_dashboard(nats_server.url, tmp_path_factory.mktemp("dash") / "dashboard.log", cwd=REPO)
    yield started
    started.stop()


def stream(until: Callable[[list[Event]], Any], url: str) -> list[Event]:
    """``wait_events`` from a thread of its own: playwright's sync API owns this thread's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(wait_events, url, RUN, until).result()


def step_on_page(page: Any) -> int:
    try:
        text = page.locator('.st-key-live-step [data-testid="stMetricValue"]').inner_text(timeout=60_000)
    except PlaywrightTimeout:  # say what the page showed instead
        raise AssertionError(f"no step on {page.url}; the page reads: {page.inner_text('body')[:1500]!r}") from None
    return int(re.sub(r"\D", "", text))


def serve(url: str, step: int, log: Path) -> subprocess.Popen[str]:
    """`trainbus serve` of the checkpoint saved from the page (not judged: no audit gate here)."""
    argv = ["serve", "--run", RUN, "--alias", "browser", "--step", str(step), "--force"]
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", *argv],
        cwd=REPO, env=trainbus_env(url), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def open_from_runs_page(context: Any, runs_page: Any) -> Any:
    """Click the run's name, the first row of the filtered Runs table (a link drawn on the table's
    canvas: the pointer hovers it first, as a person's does), and return the tab it opens."""
    table = runs_page.locator('[data-testid="stDataFrame"]').first
    table.wait_for(state="visible", timeout=60_000)
    grid = table.bounding_box(timeout=60_000)
    assert grid is not None
    x, y = grid["x"] + 30, grid["y"] + 35 + 17  # the header row, then the middle of the first row
    runs_page.mouse.move(x - 5, y)
    runs_page.mouse.move(x, y)
    with context.expect_page(timeout=60_000) as opened:
        runs_page.mouse.click(x, y)
    return opened.value


def cut_tiles(page: Any) -> list[str]:
    """Metric tiles whose label or value does not fit (``st.metric`` ends it with "…")."""
    return page.evaluate(
        """Array.from(document.querySelectorAll(
            '[data-testid="stMetricValue"] .stMarkdownEllipsis, [data-testid="stMetricLabel"]'))
            .filter(e => e.scrollWidth > e.clientWidth).map(e => e.innerText)"""
    )


def outcome(page: Any, text: str) -> None:
    """Wait until the control outcome ``text`` (e.g. ``pause: applied at step``) is on the page."""
    page.get_by_text(re.compile(re.escape(text))).first.wait_for(timeout=120_000)


def test_watch_pause_resume_set_and_stop_a_live_run_from_the_browser(
    nats_server: RunningServer, live: Trainer, dashboard: Dashboard, tmp_path: Path
) -> None:
    url = nats_server.url
    with browser() as chrome:
        context = chrome.new_context(viewport={"width": 1400, "height": 1500})  # tabs it opens are as wide
        runs = context.new_page()
        runs.goto(dashboard.url)
        runs.get_by_role("textbox", name="Run name contains").fill(RUN)
        runs.keyboard.press("Enter")
        runs.get_by_text("1 of ").first.wait_for(timeout=60_000)
        page = open_from_runs_page(context, runs)
        assert page.url == f"{dashboard.url}/run?run={RUN}"
        first = step_on_page(page)
        wait_until(lambda: step_on_page(page) > first, timeout=120, what="the step on the page to increase")

        page.get_by_role("button", name="Pause").click()
        outcome(page, "pause: applied at step")
        events = stream(lambda ev: of_type(ev, "run.state") and of_type(ev, "run.state")[-1].state == "paused", url)
        paused_at = of_type(events, "run.state")[-1].step
        page.get_by_text("· paused").first.wait_for(timeout=60_000)
        assert step_on_page(page) == paused_at

        page.get_by_role("button", name="Resume").click()
        outcome(page, "resume: applied at step")
        stream(lambda ev: of_type(ev, "run.state")[-1].state == "running", url)
        wait_until(lambda: step_on_page(page) > paused_at + 2, timeout=120, what="training to continue")

        page.get_by_text("Set hyper-parameters").click()
        page.get_by_role("spinbutton", name="learning rate").fill("0.001")
        page.get_by_role("button", name="Set", exact=True).click()
        outcome(page, "set learning_rate=0.001: applied at step")
        page.get_by_text("peak 0.001").first.wait_for(timeout=60_000)  # beside the rate in use now
        applied = [r for r in of_type(stream(lambda ev: True, url), "command.result") if r.command == "set"]
        assert applied[-1].status == "applied" and applied[-1].issued_by

        page.get_by_role("button", name="Save checkpoint").click()
        outcome(page, "save_checkpoint: applied at step")
        saved = of_type(stream(lambda ev: of_type(ev, "checkpoint"), url), "checkpoint")[-1]
        predictor = serve(url, saved.step, tmp_path / "serve.log")  # loads while the test goes on
        try:  # the predictor stops however the test ends
            page.get_by_role("tab", name="Evaluation").click()
            page.get_by_text(re.compile(r"confusion matrix at step \d+")).first.wait_for(timeout=60_000)
            page.get_by_role("tab", name="Training").click()
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] .mark-line.role-mark path').length >= 6",
                timeout=60_000,
            )
            assert cut_tiles(page) == []
            page.screenshot(path=str(tmp_path / "dashboard-run.png"), full_page=True)
            if target := os.environ.get("TRAINBUS_SCREENSHOT", ""):
                page.screenshot(path=str(REPO / target), full_page=True)

            page.get_by_role("button", name="Stop").click()
            page.get_by_text(f"Stop run {RUN}?").wait_for(timeout=30_000)
            page.get_by_role("button", name="Confirm stop").click()
            outcome(page, "stop: applied at step")
            assert live.wait(120) == 0, live.output()[-2000:]
            finished = of_type(stream(lambda ev: of_type(ev, "run.finished"), url), "run.finished")[-1]
            assert finished.status == "stopped"
            page.get_by_text("· stopped").first.wait_for(timeout=60_000)
            page.get_by_text(re.compile(rf"stopped at step {finished.step} .*no trainer listens to it")).first.wait_for(
                timeout=60_000
            )
            assert page.get_by_role("button", name="Pause").is_disabled()
            assert page.get_by_role("button", name="Stop").is_disabled()

            wait_until(
                lambda: "serving run" in (tmp_path / "serve.log").read_text() or predictor.poll() is not None,
                timeout=180,
                what="trainbus serve to load the saved checkpoint",
            )
            assert predictor.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            page.get_by_role("link", name="Try it").click()
            picked = f"browser — run {RUN}, step {saved.step}, 1 replica"  # the alias found by discovery
            page.wait_for_function(f"document.querySelector('{PICKER} input')?.value === {picked!r}", timeout=60_000)
            page.get_by_role("textbox", name="Text").fill("I am going to hurt him tomorrow.")
            page.get_by_text("with a rationale").click()  # off: the answer comes sooner (the AppTest reads one)
            page.get_by_role("button", name="Predict").click()
            answered = page.get_by_text(re.compile(rf"Answered by run {RUN}, checkpoint step {saved.step}, sha256"))
            answered.first.wait_for(timeout=120_000)  # the page's fragment shows the answer by itself
            page.get_by_text("served with --force").first.wait_for(timeout=30_000)
            bars = '[data-testid="stVegaLiteChart"] .mark-rect path'
            page.wait_for_function(f"document.querySelectorAll('{bars}').length >= 2", timeout=60_000)
            page.screenshot(path=str(tmp_path / "dashboard-tryit.png"), full_page=True)
        finally:
            predictor.terminate()
            predictor.wait(30)
