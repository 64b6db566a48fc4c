"""Checkpoint files: safetensors weights with their meta inside the header.

One atomic file carries weights and meta, so a kill between two writes can never pair
the weights of one epoch with the classes or preprocessing of another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import RunError
from engine.core.files import atomic_write_bytes, atomic_write_json, loads_bounded

META_KEY = "workbench_meta"  # the JSON meta inside the safetensors header: weights and meta are one file


def save_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors with the meta in its header, plus a JSON copy beside it for people.

    One atomic file carries both, so a kill between two writes can never pair weights of one
    epoch with the meta (classes, epoch, preprocessing) of another.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {**meta, "state_keys": keys_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)


def keys_digest(names) -> str:
    """A short fingerprint of a state dict's parameter names: tells another model's weights apart."""
    import hashlib

    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:16]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
        raise RunError(f"{path.parent.name}/{path.name} is damaged or not a safetensors file ({exc}).") from exc


def weights_meta(path: Path) -> dict[str, Any] | None:
    """The meta inside a weights file's header (None when absent); raises RunError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:
        raise RunError(f"{path.name} is damaged ({exc}).") from exc
    if raw is None:
        return None
    try:
        meta = loads_bounded(raw)
    except ValueError as exc:  # not JSON, too deep, or a number out of range
        raise RunError(f"{path.name} carries unreadable meta ({exc}).") from None
    return meta if isinstance(meta, dict) else None


def file_keys_digest(path: Path) -> str | None:
    """``keys_digest`` of the tensor names in a weights file, read from its header; None when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return keys_digest(fh.keys())
    except Exception:
        return None


def head_classes(path: Path, head: str) -> int | None:
    """How many classes the head in a weights file predicts (rows of ``HEAD.weight``), read from the
    header alone; None when the file has no such tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            if f"{head}.weight" not in fh.keys():
                return None
            return int(fh.get_slice(f"{head}.weight").get_shape()[0])
    except Exception:
        return None


def weights_finite(path: Path) -> bool:
    """Whether every floating-point tensor in a weights file is finite (False when it cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return False
    except Exception:
        return False
    return True
