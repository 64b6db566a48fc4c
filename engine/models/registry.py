"""Model names: which library provides an architecture, and what a close match is.

A name may carry its source (``timm:resnet18``, ``tv:resnet18``); a bare name is looked up in
timm first, then torchvision. Only classification models are listed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

from engine.core.errors import UnknownModelError

SOURCES = ("timm", "torchvision")
_SOURCE_ALIASES = {"timm": "timm", "tv": "torchvision", "torchvision": "torchvision"}
DEFAULT_MODEL = "timm:efficientnet_lite0"


@dataclass(frozen=True)
class ModelId:
    """A resolved model name: library + architecture."""

    source: str
    arch: str

    @property
    def qualified(self) -> str:
        prefix = "tv" if self.source == "torchvision" else "timm"
        return f"{prefix}:{self.arch}"

    def __str__(self) -> str:
        return self.qualified


@lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    from torchvision import models as tvm

    # module=tvm restricts the list to classification models (detection etc. live in submodules)
    return tuple(tvm.list_models(module=tvm))


def names_for(source: str) -> tuple[str, ...]:
    return timm_names() if source == "timm" else torchvision_names()


def all_qualified_names() -> list[str]:
    return [ModelId(s, n).qualified for s in SOURCES for n in names_for(s)]


def resolve(name: str) -> ModelId:
    """Turn a user-typed name into a ModelId, or raise with the closest names we know."""
    raw = name.strip()
    if ":" in raw:
        prefix, arch = raw.split(":", 1)
        source = _SOURCE_ALIASES.get(prefix.lower())
        if source is None:
            raise UnknownModelError(
                f"Unknown model source '{prefix}' in '{name}'. Use 'timm:NAME' or 'tv:NAME'."
            )
        if arch in names_for(source):
            return ModelId(source, arch)
    else:
        arch = raw
        for source in SOURCES:
            if arch in names_for(source):
                return ModelId(source, arch)
    raise UnknownModelError(f"Unknown model '{name}'." + _suggestion(raw))


def _suggestion(raw: str) -> str:
    bare = raw.split(":", 1)[-1].lower()
    pool = all_qualified_names()
    bare_to_full: dict[str, list[str]] = {}
    for full in pool:
        bare_to_full.setdefault(full.split(":", 1)[1], []).append(full)
    close = difflib.get_close_matches(bare, list(bare_to_full), n=5, cutoff=0.6)
    if not close:
        close = [b for b in bare_to_full if bare in b][:5]
    if not close:
        return " Run `python -m engine models --filter TEXT` to search the catalog."
    options = [full for b in close for full in bare_to_full[b]][:6]
    return " Did you mean: " + ", ".join(options) + "?"
