"""The served app in a real Chromium (Debian's, driven by playwright): every page, a real upload.

Screenshots go to test-artifacts/. Skipped, with the reason, only when no Chromium is installed.
"""
from __future__ import annotations

import re

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
    settle,
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


def test_a_race_from_the_compare_page_then_its_winner_on_the_feature_map(served_app, browser_page):
    """Issue 15's browser acceptance: a race started from the Compare page ends with a winner, and the
    Feature space page maps that run before and after fine-tuning, each with its k-NN score."""
    page = browser_page
    page.set_default_timeout(120_000)
    page.goto(f"{served_app}/compare")
    _wait_ready(page)
    page.get_by_role("button", name="Race plans under a time budget").click()
    plans = page.locator("[data-testid='stMultiSelect']").filter(has_text="Plans")
    plans.locator("input").click()
    for _ in range(3):  # keep "feature extraction" and "last 1 stage": a 2-plan race, 2 rungs
        plans.locator("input").press("Backspace")
        settle(page)
    assert "last 2 stages" not in plans.inner_text() and "last 1 stage" in plans.inner_text()
    popover = page.locator("[data-testid='stPopoverBody']")
    popover.get_by_text("lfw faces (built-in)").click()  # the one data picker, as on every page
    settle(page)
    for label, value in (("Image size", 32), ("Budget (seconds)", 6)):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Tab")
        settle(page)
    least = re.search(r"the least budget that gives each a slice in the first rung is (\d+) s", popover.inner_text())
    assert least, popover.inner_text()  # the set-up is estimated and said before anything starts
    if int(least.group(1)) > 6:  # refused beside Start, with the least that would do: take it
        assert page.get_by_role("button", name="Start race").is_disabled()
        box = page.get_by_label("Budget (seconds)", exact=True)
        box.fill(least.group(1))
        box.press("Tab")
        settle(page)
    page.get_by_role("button", name="Start race").click()
    winner = page.get_by_text("Winner:").first
    winner.wait_for(timeout=240_000)
    _no_exception(page)
    text = winner.inner_text()
    assert "feature extraction" in text or "last 1 stage" in text, text
    page.screenshot(path=str(ARTIFACTS / "compare-race.png"), full_page=True)

    page.get_by_role("button", name="Open the winner on the Evaluate page").click()
    page.get_by_text("Confusion matrix (click a cell)").first.wait_for()
    settle(page)
    page.locator("[data-testid='stSidebarNav']").get_by_text("Feature space").click()  # same session
    page.get_by_text("Feature space").first.wait_for()
    settle(page)
    page.get_by_text("a run", exact=True).click()
    page.get_by_role("button", name="Draw the map").click()  # nothing is computed before it is asked for
    page.get_by_text("after fine-tune", exact=False).first.wait_for(timeout=180_000)
    settle(page)
    _no_exception(page)
    body = page.inner_text("body")
    assert body.count("k-NN accuracy") >= 2, body[-2000:]  # pretrained and after fine-tune, each scored
    assert page.locator(".js-plotly-plot").count() >= 2
    assert "efficientnet_lite0" in body  # the winner's model, not the tiny run the app started with
    page.screenshot(path=str(ARTIFACTS / "feature-map-run.png"), full_page=True)

    page.get_by_text("a pretrained model", exact=True).click()  # the sidebar's model on a built-in set
    settle(page)
    size = page.get_by_label("Image size (px)", exact=True)
    size.fill("64")
    size.press("Tab")
    settle(page)
    page.get_by_role("button", name="Draw the map").click()
    page.get_by_text("pretrained: k-NN accuracy").first.wait_for(timeout=180_000)
    settle(page)
    _no_exception(page)
    assert "1280-D features" in page.inner_text("body")


def test_a_new_tab_paints_the_controls_before_its_first_chart(served_app, browser_page):
    """Opening a page with charts in a new tab: its controls are painted before the tab's first Plotly
    chart, whose code (4.7 MB of JavaScript) would otherwise hold the whole page back for about a second
    (ui/charts.py; bench/first_visit.py times it)."""
    from tests.browser_support import painted_at, watch_paints

    context = browser_page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    for path, control in [("training", "Start training"), ("runs", "Delete run")]:
        for visit in range(3):
            page = watch_paints(context, [control])
            try:
                page.goto(f"{served_app}/{path}")
                controls, first_chart = painted_at(page, control), painted_at(page, "chart")
                _wait_ready(page)
                _no_exception(page)
            finally:
                page.close()
            # a tab that drew nothing for 2.5 s had a starved browser (CI's 2 cores busy elsewhere; measured
            # median 1.6 s), which draws whatever has arrived in one frame: such a visit says nothing, so
            # measure again (the old code drew the chart first or with the controls on fast visits too)
            if controls < 2500:
                break
        # measured: controls 1.0-1.6 s before the chart; each page drew its chart first, or with them, before
        assert controls + 200 < first_chart, f"{path}: the chart was painted at {first_chart:.0f} ms, with or " \
                                             f"before its controls at {controls:.0f} ms (visit {visit + 1})"
    context.close()
