"""What the real-browser tests share: the system Chromium, a served app, a page, and waits on reruns.

The app is the real one (`streamlit run streamlit_app.py` on a free port, its own runs and data
folders); the browser is Debian's Chromium driven by playwright, never a downloaded one.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_lfw_run

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)
NO_CHROMIUM = "no system Chromium (apt-get install chromium) on this machine"
# every real-browser test module: `pytestmark = BROWSER` (marked, and skipped with the reason without Chromium)
BROWSER = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_run(root: Path) -> None:
    """One finished run (tiny model, LFW faces) so Evaluate and Runs have something to show."""
    tiny_lfw_run(root)


@dataclass
class ServedApp:
    url: str
    proc: subprocess.Popen
    runs: Path  # WORKBENCH_RUNS of the served app
    log: Path  # its stdout and stderr (a file, so a chatty server never blocks on a full pipe)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_app(tmp: Path, env: dict[str, str] | None = None) -> ServedApp:
    """`streamlit run streamlit_app.py` on a free port, runs and data under ``tmp``; returns once healthy."""
    port = _free_port()
    runs, log = tmp / "runs", tmp / "streamlit.log"
    env = {**os.environ, "WORKBENCH_RUNS": str(runs), "WORKBENCH_DATA": str(tmp / "data"), **(env or {})}
    env.pop("WORKBENCH_FIRST_CHART_PAUSE_S", None)  # a browser draws this app: the pause as users get it
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    app = ServedApp(f"http://127.0.0.1:{port}", proc, runs, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"{app.url}/_stcore/health", timeout=2).read() == b"ok":
                return app
        except OSError:
            time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=20)
    pytest.fail("streamlit did not start: " + app.log_tail())


def stop_app(app: ServedApp) -> None:
    """End the app, then any training it started that still runs (they live in their own sessions)."""
    app.proc.terminate()
    try:
        app.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait(timeout=20)
    end_trainings(app.runs)


def _training_process(run: Path):
    """The live process training ``run`` (its status names it; its command line must name the run), or None."""
    import json

    import psutil

    try:
        pid = json.loads((run / "status.json").read_text()).get("pid")
        proc = psutil.Process(pid) if isinstance(pid, int) else None
        return proc if proc and str(run) in " ".join(proc.cmdline()) else None
    except (OSError, ValueError, psutil.Error):
        return None


def end_trainings(runs: Path, grace_s: float = 20) -> None:
    """Cancel every training still running under ``runs`` (the cancel file, then SIGTERM, then SIGKILL)."""
    import psutil

    from engine.runs.background import request_cancel
    from engine.runs.store import RunDir

    live = {run: proc for run in (runs.iterdir() if runs.is_dir() else []) if (proc := _training_process(run))}
    for run in live:
        request_cancel(RunDir(run))
    gone, alive = psutil.wait_procs(list(live.values()), timeout=grace_s)
    for proc in alive:
        proc.terminate()
    gone, alive = psutil.wait_procs(alive, timeout=10)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The app's URL, with one finished tiny run in its runs folder."""
    tmp = tmp_path_factory.mktemp("served")
    _tiny_run(tmp / "runs")
    app = start_app(tmp)
    yield app.url
    stop_app(app)


def launch_browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)


@pytest.fixture(scope="module")
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


# when a text (or the first Plotly chart, "chart") is first painted, on the page's own clock (0: the
# navigation's start): a MutationObserver sees it enter the page and the next animation frame is when
# the browser paints it. A playwright wait reads later than the screen: its checks run on the page's main
# thread, which may be busy evaluating code just after the paint.
_PAINT_WATCH = """
window.__painted = {};
const watch = new MutationObserver(() => {
  const text = document.body ? document.body.innerText : "";
  const seen = (key) => {
    window.__painted[key] = -1;
    requestAnimationFrame(() => { window.__painted[key] = performance.now(); });
  };
  for (const marker of MARKERS) if (!(marker in window.__painted) && text.includes(marker)) seen(marker);
  if (!("chart" in window.__painted) && document.querySelector(".js-plotly-plot")) seen("chart");
});
document.addEventListener("DOMContentLoaded", () =>
  watch.observe(document.body, {childList: true, subtree: true, characterData: true}));
"""


def watch_paints(context, markers: list[str]):
    """A new tab that records when each of ``markers`` (and the first chart) is painted: see painted_at."""
    import json

    page = context.new_page()
    page.add_init_script(_PAINT_WATCH.replace("MARKERS", json.dumps(markers)))
    return page


def painted_at(page, marker: str) -> float:
    """Milliseconds on the page's clock when ``marker`` (a watched text, or "chart") was first painted."""
    if marker == "chart":
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    else:
        page.get_by_text(marker).first.wait_for(timeout=120_000)
    page.wait_for_function("m => window.__painted[m] > 0", arg=marker, timeout=30_000)
    return page.evaluate("m => window.__painted[m]", marker)


IDLE = ("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')")
# the frontend's own record of the script run (what Streamlit's e2e tests wait on): 'initial' until the
# first run starts, then 'running' / 'rerunRequested' / 'notRunning'
SCRIPT_DONE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _wait_ready(page) -> None:
    """Until the script run that the navigation started has finished and nothing is a skeleton."""
    page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
    settle(page)


def settle(page) -> None:
    """Until the rerun an action (or a navigation) started has ended: a moment for the rerun request to
    reach the frontend's state, then its script state 'notRunning', no status widget, no skeleton."""
    page.wait_for_timeout(250)
    page.wait_for_selector(SCRIPT_DONE, state="attached", timeout=180_000)
    page.wait_for_function(IDLE, timeout=180_000)
    page.wait_for_timeout(150)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.inner_text("body")[:2000]
