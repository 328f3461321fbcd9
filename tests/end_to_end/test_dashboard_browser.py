"""The dashboard in a real browser (Debian's chromium, headless, driven by playwright) during a
live tiny training run: the step moves, Pause/Resume/Set learning rate/Stop work from the page.

``TRAINBUS_SCREENSHOT=docs/dashboard-run.png`` also saves the Run page screenshot the README shows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dashboards.bench import Dashboard, browser, start_dashboard
from runtime.natsserver import RunningServer
from schemas import Event
from tests.conftest import REPO, require_tool, wait_until
from tests.end_to_end.conftest import Trainer, of_type, start_trainer, wait_events

RUN = "browser-run"


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
    text = page.locator('.st-key-live-step [data-testid="stMetricValue"]').inner_text(timeout=60_000)
    return int(re.sub(r"\D", "", text))


def outcome(page: Any, text: str) -> None:
    """Wait until the control outcome ``text`` (e.g. ``pause: applied at step``) is on the page."""
    page.get_by_text(re.compile(re.escape(text))).first.wait_for(timeout=120_000)


def test_watch_pause_resume_set_and_stop_a_live_run_from_the_browser(
    nats_server: RunningServer, live: Trainer, dashboard: Dashboard, tmp_path: Path
) -> None:
    url = nats_server.url
    with browser() as chrome:
        page = chrome.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(dashboard.url)
        page.get_by_role("textbox", name="Run name contains").fill(RUN)
        page.keyboard.press("Enter")
        page.get_by_text("1 of ").first.wait_for(timeout=60_000)
        grid = page.locator('[data-testid="stDataFrame"]').bounding_box()
        assert grid is not None
        page.mouse.click(grid["x"] + 15, grid["y"] + 35 + 17)  # the first row's selection box
        page.wait_for_url(re.compile(rf"/run\?run={RUN}$"), timeout=60_000)
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
        applied = [r for r in of_type(stream(lambda ev: True, url), "command.result") if r.command == "set"]
        assert applied[-1].status == "applied" and applied[-1].issued_by

        page.get_by_role("tab", name="Evaluation").click()
        page.get_by_text(re.compile(r"confusion matrix at step \d+")).first.wait_for(timeout=60_000)
        page.get_by_role("tab", name="Training").click()
        page.wait_for_function(
            "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] .mark-line.role-mark path').length >= 6",
            timeout=60_000,
        )
        page.screenshot(path=str(tmp_path / "dashboard-run.png"), full_page=True)
        if target := os.environ.get("TRAINBUS_SCREENSHOT"):
            page.screenshot(path=str(REPO / target), full_page=True)

        page.get_by_role("button", name="Stop").click()
        page.get_by_text(f"Stop run {RUN}?").wait_for(timeout=30_000)
        page.get_by_role("button", name="Confirm stop").click()
        outcome(page, "stop: applied at step")
        assert live.wait(120) == 0, live.output()[-2000:]
        finished = of_type(stream(lambda ev: of_type(ev, "run.finished"), url), "run.finished")[-1]
        assert finished.status == "stopped"
        page.get_by_text("· stopped").first.wait_for(timeout=60_000)
