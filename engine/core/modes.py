"""Eval mode for a block of code, with every module put back exactly as it was, one user at a time.

Why per module: ``model.train(was_training)`` after an evaluation would switch a frozen
BatchNorm inside a training model back to training mode (its running stats would then move).
Why a lock: the app shares one cached model between sessions and threads; a Grad-CAM's hooks
or a mode switch must never meet another thread's forward pass halfway.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from torch import nn

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one lock of ``model`` (re-entrant: a locked caller may evaluate again inside)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever the block switches, each module regains its own train/eval flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever the block's forwards do to the buffers (BatchNorm statistics), they are put back: a probe
    that runs the model as in training leaves no trace on it."""
    import torch

    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block under the model's lock; afterwards each module regains its mode."""
    with model_lock(model), modes_restored(model):
        model.eval()
        yield model
