"""Run every bench script in this folder, one after another."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

for script in sorted(HERE.glob("*.py")):
    if script.name == Path(__file__).name:
        continue
    print(f"== {script.name}")
    runpy.run_path(str(script), run_name="__main__")
