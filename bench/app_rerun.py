"""Page rerun time with warm caches (goal < 100 ms) and the app's peak RSS (prints numbers).

Runs each page through Streamlit's AppTest in this process: the first run fills the caches
(model, summaries, dataset overview), the next runs are what a user's click costs.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WORKBENCH_RUNS", tempfile.mkdtemp(prefix="bench-runs-"))

from streamlit.testing.v1 import AppTest  # noqa: E402

PAGES = ["views/home.py", "views/model_explorer.py", "views/freeze_configurator.py", "views/training.py",
         "views/inference.py"]


def main() -> None:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300)
    at.run()
    for name in PAGES:
        at.switch_page(name)
        start = time.perf_counter()
        at.run()
        first = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - start)
        status = "ok" if statistics.median(times) < 0.1 else "over goal"
        print(f"{name.split('/')[-1]:<26} first run {first * 1000:7.0f} ms   rerun median {statistics.median(times) * 1000:6.1f} ms"
              f"  ({status}; AppTest overhead included)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
