"""Running the engine's CLI as a user would, in a process of its own, for the hostile corpus.

Each call is a new process that runs ``engine.cli.main`` as ``python -m engine`` does (its exit code,
its streams, a traceback and exit 1 for an unexpected exception, -9 when a fault kills it), forked from
a server that has imported torch, timm and the engine once (multiprocessing's forkserver, itself a fresh
process, never this test process). Why: a tiny training's process spent ~3 of its ~3.5 s importing
them, and the corpus starts some 150 of them. ``fresh=True`` starts a real ``python -m engine`` instead.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import traceback
import types
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


_STARTING = threading.Lock()
PRELOAD = ["torch", "timm", "torchvision", "engine.cli", "engine.training.loop", "engine.models.factory"]


def engine(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None,
           fresh: bool = False) -> Ran:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if fresh or "--background" in args:  # a background start leaves processes behind: from a real one, as before
        proc = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd or ROOT)
        return Ran(proc.returncode, proc.stdout, proc.stderr)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="engine-cli-") as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        child = context.Process(target=_cli_child, args=(list(args), full_env, str(cwd or ROOT), str(out), str(err)))
        with _STARTING:  # the child would run this process's __main__ first: after an AppTest, a page script
            main, sys.modules["__main__"] = sys.modules.get("__main__"), types.ModuleType("__main__")
            try:
                child.start()
            finally:
                sys.modules["__main__"] = main
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["engine", *args], timeout)
        return Ran(child.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace"))


def _cli_child(args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """``python -m engine ARGS`` in this forked process: its environment, folder, streams and exit code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.argv = [str(ROOT / "engine"), *args]
    code = 1
    try:
        from engine.cli import main

        code = main(args)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2), as engine/__main__.py
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what Python prints for an uncaught exception, and its exit 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
