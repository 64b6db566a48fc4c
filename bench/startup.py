"""Start-up and model-creation timings (prints numbers; not a test).

python bench/startup.py
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    print(f"cli models --filter resnet: {timed_cli('models', '--filter', 'resnet'):.2f} s")
    from engine.models.factory import create_model

    start = time.perf_counter()
    create_model()
    print(f"create_model() default packaged: {time.perf_counter() - start:.2f} s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
