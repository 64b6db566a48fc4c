"""The Training page's augmentation controls as one SPEC (engine/data/augment.py), and its preview.

Each control is one operation of the SPEC; a value the engine refuses (rotate 400, a negative colour
strength) is said beside that control, found by the refusal's ``part``. The page builds the widgets
(bound to the URL like its other fields); this turns their values into the SPEC and draws the grid.
"""
from __future__ import annotations

from typing import Any

from engine.core.errors import EngineError

# SPEC operation -> the control's key (the page's slots are keyed by it)
CONTROL_OF = {"flip": "aug_flip", "rotate": "aug_rotate", "color": "aug_color", "crop": "aug_crop",
              "randaug": "aug_randaug", "mixup": "aug_mixup", "cutmix": "aug_cutmix", "smooth": "aug_smooth",
              "augment": "augment"}
PREVIEW_N = 8


def spec_from_controls(on: bool, values: dict[str, Any]) -> str | bool:
    """The SPEC the controls say (False: augmentation off). ``values``: operation -> the control's value;
    0 or empty means off, every other value goes into the SPEC as typed, so the engine judges it."""
    if not on:
        return False
    parts = ["flip"] if values.get("flip") else []
    for name in ("rotate", "color", "crop", "randaug", "mixup", "cutmix", "smooth"):
        value = values.get(name)
        if value is not None and value != 0:
            parts.append(f"{name}:{value:g}")
    return ",".join(parts) or False


def accepted_spec(on: bool, values: dict[str, Any]) -> str | None:
    """The canonical SPEC of the controls when the engine accepts it and it augments; None otherwise
    (a refusal is said beside its control by the page's settings check)."""
    from engine.data.augment import canonical

    try:
        return canonical(spec_from_controls(on, values)) or None
    except EngineError:
        return None


def control_for(exc: EngineError) -> str | None:
    """The key of the control a refusal is about (its ``part``), or None when it is not about augmentation."""
    if getattr(exc, "field", None) != "augment":
        return None
    return CONTROL_OF.get(getattr(exc, "part", "augment"), "augment")


def show_preview(where, source: str, spec: str, image_size: int | None, seed: int | None, stamp: tuple) -> None:
    """Eight augmented versions of one training image of ``source`` under ``spec``; a data problem is
    said in its place (the settings above stay usable)."""
    from ui.cache import augment_grid
    from ui.errors import show_error

    tile = max(32, min(int(image_size or 96), 192))  # the run's size, kept viewable
    seed = int(seed) if isinstance(seed, (int, float)) and 0 <= seed < 2**32 else 0
    try:
        grid = augment_grid(source, spec, tile, seed, stamp)
    except EngineError as exc:
        show_error(exc, where)
        return
    where.image(grid, output_format="PNG",
                caption=f"{PREVIEW_N} augmented versions of one training image ({spec}); they change as the "
                        "controls move")
