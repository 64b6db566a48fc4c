"""A page's first visit, as a new user sees it: seconds from opening the page's URL in a fresh browser
session until its controls are drawn and the script has finished (goal: under 2 s on 2 idle cores),
on the served app (`streamlit run`) in Debian's Chromium. The server is warmed by one visit first
(its imports are paid once per server, not per page); that visit is printed too.

    python bench/first_visit.py      # prints one line per page, and the server's own first visit
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_support import CHROMIUM, _wait_ready, launch_browser, start_app, stop_app  # noqa: E402

PAGES = ["", "model_explorer", "freeze_configurator", "training", "inference", "compare", "evaluate",
         "feature_map", "runs"]
GOAL_S = 2.0


def visit(browser, url: str) -> float:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # a new session: nothing cached in it
    page = context.new_page()
    start = time.monotonic()
    page.goto(url)
    _wait_ready(page)
    took = time.monotonic() - start - 0.4  # settle() waits 0.4 s of its own after the run has ended
    context.close()
    return took


def main() -> None:
    if CHROMIUM is None:
        print("no system Chromium: apt-get install chromium")
        return
    from playwright.sync_api import sync_playwright

    from tests.conftest import tiny_lfw_run

    tmp = Path(tempfile.mkdtemp(prefix="bench-first-visit-"))
    tiny_lfw_run(tmp / "runs")  # Evaluate, Inference and Runs have a run to show
    app = start_app(tmp)
    try:
        with sync_playwright() as pw:
            browser = launch_browser(pw)
            print(f"{'server, first page ever (imports)':<36} {visit(browser, app.url):6.1f} s")
            for name in PAGES:
                took = visit(browser, f"{app.url}/{name}")
                print(f"{name or 'home':<36} {took:6.1f} s  {'ok' if took < GOAL_S else 'over the 2 s goal'}")
            browser.close()
    finally:
        stop_app(app)


if __name__ == "__main__":
    main()
