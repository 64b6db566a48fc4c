"""The served app in a real Chromium (Debian's, driven by playwright): every page, a real upload.

Screenshots go to test-artifacts/. Skipped, with the reason, only when no Chromium is installed.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium) on this machine"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_run(root: Path) -> None:
    """One finished run (tiny model, LFW faces) so Evaluate and Runs have something to show."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    config = TrainConfig(model="timm:test_resnet", weights="none", data="lfw", image_size=32, max_per_class=12,
                         epochs=1, num_workers=0, plan=FreezePlan.full(head_lr=1e-3).to_dict())
    fit(config, create_run(root, config.to_dict()))


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    port = _free_port()
    tmp = tmp_path_factory.mktemp("served")
    env = {**os.environ, "WORKBENCH_RUNS": str(tmp / "runs"), "WORKBENCH_DATA": str(tmp / "data")}
    _tiny_run(tmp / "runs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def _wait_ready(page) -> None:
    """Until the script run that the navigation started has finished and nothing is a skeleton."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
    try:
        page.wait_for_selector("[data-testid='stStatusWidget']", timeout=5_000)
    except PlaywrightTimeout:
        pass  # the run was already over
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=180_000)
    page.wait_for_timeout(300)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.inner_text("body")[:2000]


def test_every_page_renders_and_inference_predicts(served_app, browser_page, cat_photo):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser_page
    # the server's very first request goes straight to a page: it must still get the router
    page.goto(f"{served_app}/compare")
    _wait_ready(page)
    page.get_by_text("Compare strategies").first.wait_for(timeout=60_000)
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Model Explorer" in nav and "common" not in nav, nav
    assert "Active model" in page.locator("[data-testid='stSidebar']").inner_text()
    page.goto(served_app)
    _wait_ready(page)
    page.get_by_text("Transfer-learning workbench").first.wait_for(timeout=60_000)
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)
    for path, marker in [("model_explorer", "Call model(x)"), ("freeze_configurator", "Parameters per stage"),
                         ("training", "1. Data"), ("compare", "Compare strategies"),
                         ("evaluate", "Confusion matrix (click a cell)"), ("runs", "Overlay curves of"),
                         ("inference", "Upload one or more images")]:
        page.goto(f"{served_app}/{path}")
        _wait_ready(page)
        page.get_by_text(marker).first.wait_for(timeout=120_000)
        _no_exception(page)
        page.screenshot(path=str(ARTIFACTS / f"{path}.png"), full_page=True)
    page.locator("input[type='file']").first.set_input_files(str(cat_photo))
    title = page.get_by_text("cat:").first  # chart title "tiger cat: 39.9%"
    title.wait_for(timeout=120_000)
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "inference-prediction.png"), full_page=True)
    assert "%" in (title.text_content() or "")

    # Evaluate: clicking a confusion-matrix cell filters the gallery to that (true, predicted) pair
    page.goto(f"{served_app}/evaluate")
    _wait_ready(page)
    cells = page.locator(".js-plotly-plot .scatterlayer .point")
    cells.first.wait_for(timeout=60_000)
    box = cells.nth(2).bounding_box()  # row "face" (true), column "non-face" (predicted)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    true_box = page.get_by_role("combobox", name="True class (a confusion-matrix row)")
    page.wait_for_function("() => document.querySelector('input[aria-label^=\"True class\"]').value === 'face'",
                           timeout=60_000)
    assert page.get_by_role("combobox", name="Predicted class (a column)").input_value() == "non-face"
    assert true_box.input_value() == "face"
    page.screenshot(path=str(ARTIFACTS / "evaluate-cell-click.png"), full_page=True)
