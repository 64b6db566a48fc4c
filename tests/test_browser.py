"""The served app in a real Chromium (Debian's, driven by playwright): every page, a real upload.

Screenshots go to test-artifacts/. Skipped, with the reason, only when no Chromium is installed.
"""
from __future__ import annotations

from tests.browser_support import (  # noqa: F401 (fixtures and helpers, also imported from here by others)
    ARTIFACTS,
    BROWSER,
    CHROMIUM,
    FLAGS,
    NO_CHROMIUM,
    _free_port,
    _no_exception,
    _tiny_run,
    _wait_ready,
    browser_page,
    served_app,
)

pytestmark = BROWSER


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
