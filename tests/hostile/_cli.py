"""Running the engine's CLI as a user would, in a fresh process, for the hostile corpus."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

# the smallest real training: a tiny timm model on 120 real digits at 32 px (a few seconds)
TINY_CONFIG = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
                   max_per_class=12, num_workers=0)
TINY_TRAIN = ["--model", "timm:test_resnet", "--weights", "none", "--data", "digits", "--image-size", "32",
              "--batch-size", "16", "--max-per-class", "12", "--workers", "0", "--seed", "0"]


@dataclass
class Ran:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def assert_one_line_error(self, phrase: str, rc: int = 2) -> None:
        """The CLI's promise for a user error: exit code, exactly one line, no traceback."""
        assert "Traceback" not in self.err + self.out, self.err[-2000:]
        assert self.rc == rc, (self.rc, self.err[-2000:])
        assert len(self.error_lines) == 1, self.err
        assert self.error_lines[0].startswith("error: "), self.err
        assert phrase.lower() in self.error_lines[0].lower(), (phrase, self.err)


def engine(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None) -> Ran:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)
    return Ran(proc.returncode, proc.stdout, proc.stderr)
