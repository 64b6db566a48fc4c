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

# each page's last control, drawn once the page's script has reached its end
PAGES = {"": "everything works offline", "model_explorer": "Use this model", "freeze_configurator": "Measure train-vs-eval",
         "training": "Start training", "inference": "Upload one or more images", "compare": "Race plans under",
         "evaluate": "Explain class", "feature_map": "Draw the map", "runs": "Delete run"}
GOAL_S = 2.0


def visit(context, url: str, marker: str) -> tuple[float, float]:
    """Seconds until the page's last control shows, and until its script run has ended. Each visit is a
    new tab, so a new Streamlit session; the tabs share the browser's HTTP cache, as a user's do (a
    fresh browser profile per visit would time the download of the frontend's chart library instead)."""
    page = context.new_page()
    start = time.monotonic()
    page.goto(url)
    page.get_by_text(marker).first.wait_for(timeout=120_000)
    shown = time.monotonic() - start
    _wait_ready(page)
    done = time.monotonic() - start - 0.4  # settle() waits 0.4 s of its own after the run has ended
    page.close()
    return shown, done


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
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            cold = visit(context, f"{app.url}/training", PAGES["training"])[0]  # the browser caches the frontend
            print(f"the server's first page ever (imports; the browser loads the app): training {cold:5.1f} s")
            for name, marker in PAGES.items():
                shown, done = visit(context, f"{app.url}/{name}", marker)
                print(f"{name or 'home':<24} controls {shown:5.1f} s  run ended {done:5.1f} s  "
                      f"{'ok' if shown < GOAL_S else 'over the 2 s goal'}")
            browser.close()
    finally:
        stop_app(app)


if __name__ == "__main__":
    main()
