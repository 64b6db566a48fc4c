"""How many CPU threads the app's own torch work uses (predict, Evaluate, Grad-CAM, model tracing).

Measured on 2 cores with a training running in its own process (nice 10): one prediction at 224 px
in the app took 1.3-2 s with torch's default two threads, 60-80 ms with one. Every OpenMP region
waits at a barrier for its slowest thread, and a thread that shares its core with the training
arrives late at each of the ~100 barriers of a forward pass. So while a training holds the CPU the
app's reruns use one thread (the training keeps the cores it was given); when the machine is idle
they get torch's default back, which a long Evaluate pass on a big machine wants.
"""
from __future__ import annotations

import torch

from engine.runs.locks import device_lock

IDLE_THREADS = torch.get_num_threads()  # torch's default for this machine, read before anyone changes it


def app_threads() -> int:
    """The thread count for this rerun: 1 while a training holds the CPU, else torch's default."""
    return 1 if device_lock("cpu").busy() else IDLE_THREADS


def set_app_threads() -> int:
    """Apply app_threads() (torch applies it to each new script thread too); returns the count."""
    threads = app_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
