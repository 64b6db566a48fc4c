"""A page's first visit, as a new user sees it: seconds until its controls are drawn (goal: under 2 s on
2 idle cores), on the served app (`streamlit run`) in Debian's Chromium, reached the two ways people
reach a page:
- by a click in the sidebar, from Home, in the same tab: the page's first visit in this session (the
  usual way; the app's frontend, its chart library included, is already loaded in the tab);
- by opening its URL in a new tab (a link, a bookmark, a refresh): a new session, and the tab must
  load the frontend's code for every kind of element the page draws. A page with a Plotly chart pays
  for Plotly's 4.7 MB of JavaScript here (about 1 s on this CPU), once per tab.
The server is warmed by one visit first (its imports are paid once per server, not per page); that
visit is printed too.

    python bench/first_visit.py                    # one line per page (median of 3 visits each way)
    python bench/first_visit.py training evaluate  # only these pages
    python bench/first_visit.py --repeat 5         # the median of 5 visits (single visits vary by ~1 s)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_support import (  # noqa: E402
    CHROMIUM,
    _wait_ready,
    launch_browser,
    painted_at,
    start_app,
    stop_app,
    watch_paints,
)

# each page's last control, drawn once the page's script has reached its end
PAGES = {"": "everything works offline", "model_explorer": "Use this model", "freeze_configurator": "Measure train-vs-eval",
         "training": "Start training", "inference": "Upload one or more images", "compare": "Race plans under",
         "evaluate": "Explain class", "feature_map": "Draw the map", "runs": "Delete run"}
TITLES = {"": "Home", "model_explorer": "Model Explorer", "freeze_configurator": "Freeze Configurator",
          "training": "Training", "inference": "Inference", "compare": "Compare", "evaluate": "Evaluate",
          "feature_map": "Feature space", "runs": "Runs"}
GOAL_S = 2.0


def click_from_home(context, base: str, title: str, marker: str) -> float:
    """Seconds from a click on the page's sidebar link (Home drawn and idle) until its last control shows."""
    page = watch_paints(context, list(PAGES.values()))
    page.goto(base)
    page.get_by_text(PAGES[""]).first.wait_for(timeout=120_000)
    _wait_ready(page)
    link = page.locator("[data-testid='stSidebarNavLink']").filter(has_text=title).first
    link.hover()
    start = page.evaluate("() => performance.now()")
    link.click()
    shown = (painted_at(page, marker) - start) / 1000
    _wait_ready(page)
    page.close()
    return shown


def visit(context, url: str, marker: str) -> float:
    """Seconds from the navigation's start until the page's last control is painted. Each visit is a new
    tab, so a new Streamlit session; the tabs share the browser's HTTP cache, as a user's do (a fresh
    browser profile per visit would time the download of the frontend's chart library instead)."""
    page = watch_paints(context, list(PAGES.values()))
    page.goto(url)
    shown = painted_at(page, marker) / 1000
    _wait_ready(page)
    page.close()
    return shown


def _median(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{statistics.median(seconds):.1f} s ({min(seconds):.1f}-{max(seconds):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="default: every page; " + ", ".join(p or "home" for p in PAGES))
    parser.add_argument("--repeat", type=int, default=3, help="visits per page; the median is printed")
    args = parser.parse_args()
    unknown = set(args.pages) - {p or "home" for p in PAGES}
    if unknown:
        parser.error(f"no such page: {', '.join(sorted(unknown))}")
    chosen = {name: PAGES[name] for name in PAGES if not args.pages or (name or "home") in args.pages}
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
            cold = visit(context, f"{app.url}/training", PAGES["training"])  # the browser caches the frontend
            print(f"the server's first page ever (imports; the browser loads the app): training {cold:5.1f} s")
            print(f"{'page':<22}{'sidebar click':>16}{'new tab':>16}   (median, range over visits)")
            for name, marker in chosen.items():
                repeat = range(max(1, args.repeat))
                clicks = [click_from_home(context, app.url, TITLES[name], marker) for _ in repeat] if name else []
                opens = [visit(context, f"{app.url}/{name}", marker) for _ in repeat]
                print(f"{name or 'home':<22}{_median(clicks):>16}{_median(opens):>16}   "
                      f"{'ok' if max(statistics.median(clicks or [0]), statistics.median(opens)) < GOAL_S else 'over the 2 s goal'}",
                      flush=True)
            browser.close()
    finally:
        stop_app(app)


if __name__ == "__main__":
    main()
