"""The dashboard in a real browser (Debian's chromium driven by Playwright), one flow as a person would use it:
start a run of the quickstart model from the form, watch its curve gain points, stop it and resume it, look at its
data, compare base and adapter in the playground, export it and run the deploy check. A screenshot of each page is
written to $LORAKIT_TEST_ARTIFACTS/ui (default test-artifacts/ui)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from lorakit.ui.app import create_ui_app
from lorakit.ui.paths import Roots
from ui_helpers import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes say: without the background-networking flags chromium keeps trying to reach Google.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "ui"


@pytest.fixture
def dashboard(tmp_path):
    """`lorakit ui` on a free loopback port, in a thread of this process (training runs in its own processes)."""
    import uvicorn

    root = tmp_path / "runs"
    root.mkdir()
    port = free_port()
    hosts = {f"127.0.0.1:{port}"}
    server = uvicorn.Server(uvicorn.Config(create_ui_app(Roots(root), token="t0ken", hosts=hosts), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{port}/?token=t0ken", root
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} not found: .ci/run installs Debian's chromium for this test")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


def test_a_run_from_the_form_to_the_playground_and_an_export(dashboard, browser):
    from playwright.sync_api import expect

    url, root = dashboard
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def status() -> str:
        return page.locator("h1 [data-status]").get_attribute("data-status")

    # The form: a bad value is shown beside its field; the quickstart example passes and gets a memory plan.
    page.goto(url + "#/new")
    page.click("#fill-quickstart")
    page.fill("#run-name", "demo")
    page.fill("#f-train\\.max_steps", "80")
    page.fill("#f-train\\.log_every", "1")
    page.fill("#f-train\\.lr", "-1")
    page.click("#check")
    expect(page.locator('[data-field="train.lr"] .error')).to_contain_text("must be a positive number")
    page.fill("#f-train\\.lr", "0.003")
    page.click("#check")
    expect(page.locator("#plan")).to_contain_text("predicted peak", timeout=60_000)
    shot("new-run")

    # Start it: a separate process; the curve gains points as metrics.jsonl grows.
    page.click("#start")
    page.wait_for_url("**#/run/demo")
    points = "() => Number(document.querySelector('#curve')?.dataset.points || 0)"
    page.wait_for_function(f"{points} >= 4", timeout=120_000)
    seen = page.evaluate(points)
    page.wait_for_function(f"{points} > {seen}", timeout=60_000)
    shot("run-live")

    # Stop (a checkpoint first), then resume from it to the end.
    page.click("#stop")
    expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "interrupted", timeout=60_000)
    assert list((root / "demo" / "checkpoints").iterdir()), "stopping saved no checkpoint"
    stopped_at = page.evaluate(points)
    assert stopped_at < 80
    page.click("#resume")
    expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "finished", timeout=180_000)
    page.wait_for_function(f"{points} == 80", timeout=30_000)
    expect(page.locator("#stop")).to_be_disabled()
    shot("run-finished")

    page.goto(url + "#/runs")
    expect(page.locator('#runs [data-run="demo"] [data-status]')).to_have_attribute("data-status", "finished")
    shot("runs")

    # The data as the model sees it, trained tokens marked.
    page.goto(url + "#/data/demo")
    expect(page.locator("#data-view mark").first).to_be_visible(timeout=60_000)
    shot("data")

    # The playground: base and adapter answer the same prompt side by side, differently.
    page.goto(url + "#/playground/demo")
    page.click("#pg-load")
    page.wait_for_function("() => document.querySelector('#pg-state').textContent.startsWith('loaded') || "
                           "!document.querySelector('#toast').hidden", timeout=60_000)
    assert page.locator("#pg-state").text_content().startswith("loaded"), page.locator("#toast").text_content()
    page.fill("#pg-prompt", "Convert to JSON: The crab is yellow, has 6 legs and lives in the forest.")
    page.click("#pg-send")
    page.wait_for_function("() => [...document.querySelectorAll('#pg-columns .answer')]"
                           ".every(a => a.dataset.done === '1')", timeout=60_000)
    base, adapted = page.locator("#pg-columns .answer").all_text_contents()
    assert base.strip() and adapted.strip() and base != adapted
    page.fill("#pg-prompt", "Make a JSON record: The wolf has 2 legs, is brown and lives in the mountains.")
    page.click("#pg-send")  # a second turn: each column goes on with its own earlier answer as the history
    page.wait_for_function("() => document.querySelectorAll('#pg-columns .answer').length === 4 && "
                           "[...document.querySelectorAll('#pg-columns .answer')].every(a => a.dataset.done === '1')",
                           timeout=60_000)
    assert page.locator('[data-column] .you').count() == 4
    shot("playground")

    # Export (a separate process) and the deploy check.
    page.goto(url + "#/export/demo")
    page.select_option("#ex-format", "hf")
    page.click("#ex-start")
    expect(page.locator('[data-format="hf"]')).to_have_attribute("data-state", "done", timeout=180_000)
    assert (root / "exports" / "demo-hf" / "config.json").is_file()
    page.click("#ex-check-btn")
    expect(page.locator('#ex-check [data-target="vllm"]')).to_contain_text("ok", timeout=60_000)
    shot("export")
    assert errors == [], errors
