"""The model catalog: every timm and torchvision classifier with family and parameter count.

Counting parameters needs the architecture built, not its weights: models are created on the
``meta`` device (no memory, no init). Counting all ~1,450 takes minutes, so the counts ship
precomputed in ``catalog_params.json`` (keyed by library version) and anything missing there is
counted on demand and memoised.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from engine.models.registry import SOURCES, ModelId, names_for
from engine.models.weights import PACKAGED

PARAMS_FILE = Path(__file__).with_name("catalog_params.json")


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # qualified, e.g. "tv:resnet18"
    source: str
    arch: str
    family: str
    params: int | None
    packaged: bool  # offline weights available

    def to_dict(self) -> dict:
        return asdict(self)


def family_of(mid: ModelId) -> str:
    """Module that defines the architecture: timm.models.resnet -> 'resnet'."""
    try:
        if mid.source == "timm":
            import timm

            module = timm.models.model_entrypoint(mid.arch).__module__
        else:
            from torchvision import models as tvm

            module = tvm.get_model_builder(mid.arch).__module__
    except Exception:
        return "unknown"
    return module.rsplit(".", 1)[-1].lstrip("_")


@lru_cache(maxsize=1)
def _shipped_counts() -> dict[str, int]:
    try:
        data = json.loads(PARAMS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.get("params", {}).items() if v is not None}


@lru_cache(maxsize=4096)
def count_params_meta(qualified: str) -> int | None:
    """Build the architecture on the meta device and count its parameters (no memory used)."""
    import torch

    source, arch = qualified.split(":", 1)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if source == "timm":
                import timm

                model = timm.create_model(arch, pretrained=False)
            else:
                from torchvision import models as tvm

                model = tvm.get_model(arch, weights=None)
    except Exception:
        return _torchvision_meta_count(source, arch)
    return sum(p.numel() for p in model.parameters())


def _torchvision_meta_count(source: str, arch: str) -> int | None:
    """Some builders (RegNet) cannot run on meta; their weights enum records the count."""
    if source != "tv":
        return None
    from torchvision import models as tvm

    try:
        return int(tvm.get_model_weights(arch).DEFAULT.meta["num_params"])
    except Exception:
        return None


def param_count(qualified: str, compute_missing: bool = True) -> int | None:
    shipped = _shipped_counts()
    if qualified in shipped:
        return shipped[qualified]
    return count_params_meta(qualified) if compute_missing else None


@lru_cache(maxsize=1)
def catalog() -> tuple[CatalogEntry, ...]:
    entries = []
    for source in SOURCES:
        for arch in names_for(source):
            mid = ModelId(source, arch)
            entries.append(CatalogEntry(
                name=mid.qualified, source=source, arch=arch, family=family_of(mid),
                params=param_count(mid.qualified, compute_missing=False),
                packaged=source == "timm" and arch in PACKAGED,
            ))
    return tuple(entries)


def search(text: str = "", *, source: str | None = None, packaged_only: bool = False,
           limit: int | None = None) -> list[CatalogEntry]:
    """Case-insensitive substring search over name and family; missing counts filled on demand."""
    needle = text.strip().lower()
    found = []
    for entry in catalog():
        if source and entry.source != source:
            continue
        if packaged_only and not entry.packaged:
            continue
        if needle and needle not in entry.name.lower() and needle not in entry.family.lower():
            continue
        found.append(entry)
        if limit is not None and len(found) >= limit:
            break
    return [
        e if e.params is not None else CatalogEntry(**{**asdict(e), "params": count_params_meta(e.name)})
        for e in found
    ]
