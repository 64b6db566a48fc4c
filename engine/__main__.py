"""``python -m engine ...``: the CLI, ended once Python's own shutdown is done.

Why not a plain ``sys.exit``: after the interpreter has run its exit handlers and flushed its
streams, libtorch's C++ static destructors page ~130 MB of library code back in, only to free
memory the operating system takes back anyway. A finished ``predict`` would peak that much higher
on a shared server, for nothing. The handler below is registered before anything else, so it runs
last: every other exit handler (multiprocessing's worker clean-up, logging's flush) has run by then.
"""
import atexit
import os
import sys

_status = {"code": 1}  # what the process exits with: an unexpected exception leaves 1


def _leave() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(_status["code"])


atexit.register(_leave)
_nice = os.environ.pop("WORKBENCH_NICE", "")  # set for background work (runs/background.py)
if _nice:
    try:
        os.nice(int(_nice))  # now, before torch starts its threads: they inherit it
    except (ValueError, OSError, AttributeError):  # not a number, not allowed, or not POSIX
        pass

from engine.cli import main  # noqa: E402 - after the handler, so that it runs last

try:
    _status["code"] = main()
except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
    _status["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
sys.exit(_status["code"])
