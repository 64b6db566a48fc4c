"""Augmentation as one short SPEC: ``flip,rotate:15,color:0.3,crop:0.7,randaug:9,mixup:0.2,cutmix:1,smooth:0.1``.

The same text comes from the CLI (``--augment SPEC``), the Training page's controls and a run's
config.json, so one parser reads it and refuses nonsense with one sentence naming the bad part.
A run records the canonical text (``spec_text``: fixed order, numbers in short form), so two runs
with the same augmentation say so in the same words. No torch/timm import here: the config reads
this on every validation.

Per image (the DataLoader's transform): flip, rotate, color, crop, randaug. Per batch (the training
step only, never evaluation): mixup, cutmix. In the loss: smooth (label smoothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from engine.core.errors import EngineError, printable

DEFAULT_TEXT = "crop:0.7"  # what a bare --augment (and an old run's "augment": true) always meant
NONE_WORDS = ("", "none", "off", "false")
GRAMMAR = ("flip, rotate:DEGREES (0-180], color:STRENGTH (0-1], crop:SMALLEST_AREA (0-1], randaug[:MAGNITUDE 0-30], "
           "mixup:ALPHA (0-10], cutmix:ALPHA (0-10], smooth:LABEL_SMOOTHING (0-1), or default (= crop:0.7)")


class AugmentError(EngineError):
    """A refused SPEC; ``part`` names the operation at fault (``rotate``), so the app can say it beside
    that control. (engine.config turns it into its ConfigError('augment', ...), keeping ``part``.)"""

    field = "augment"

    def __init__(self, part: str, message: str):
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class AugmentSpec:
    """One augmentation recipe. Zero / None / False: that operation is off."""

    flip: bool = False  # horizontal mirror with probability 0.5 (not for digits or text)
    rotate: float = 0.0  # random rotation within +- degrees
    color: float = 0.0  # brightness, contrast and saturation jitter strength (torchvision ColorJitter)
    crop: float | None = None  # random resized crop of at least this share of the area; None: the whole image
    randaug: int | None = None  # timm's RandAugment at this magnitude (rand-mM-mstd0.5); None: off
    mixup: float = 0.0  # mixup's Beta(alpha, alpha); 0: off
    cutmix: float = 0.0  # cutmix's Beta(alpha, alpha); 0: off
    smooth: float = 0.0  # label smoothing of the training loss

    def __bool__(self) -> bool:
        """Any augmentation at all (what the feature caches check: cached inputs are never augmented)."""
        return any(getattr(self, f.name) not in (None, 0, 0.0, False) for f in fields(self))

    @property
    def per_image(self) -> bool:
        """Whether the training transform differs from the evaluation one."""
        return bool(self.flip or self.rotate or self.color or self.crop is not None or self.randaug is not None)

    @property
    def mixes(self) -> bool:
        """Whether training batches are blended (mixup or cutmix): targets become soft."""
        return bool(self.mixup or self.cutmix)

    @property
    def auto_augment(self) -> str | None:
        """timm's auto_augment string for RandAugment, or None."""
        return None if self.randaug is None else f"rand-m{self.randaug}-mstd0.5"

    def text(self) -> str:
        """The canonical SPEC: fixed order, short numbers; '' for none."""
        return spec_text(self)

    def settings(self) -> dict[str, Any]:
        """Plain values (the exported script's AUGMENT setting)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# name -> (kind, low, high, low_open, high_open); kind: flag | float | int
_OPS: dict[str, tuple[str, float, float, bool, bool]] = {
    "flip": ("flag", 0, 0, False, False),
    "rotate": ("float", 0.0, 180.0, True, False),
    "color": ("float", 0.0, 1.0, True, False),
    "crop": ("float", 0.0, 1.0, True, False),
    "randaug": ("int", 0, 30, False, False),
    "mixup": ("float", 0.0, 10.0, True, False),
    "cutmix": ("float", 0.0, 10.0, True, False),
    "smooth": ("float", 0.0, 1.0, True, True),
}
_ALIASES = {"hflip": "flip", "rotation": "rotate", "rot": "rotate", "jitter": "color", "color_jitter": "color",
            "randaugment": "randaug", "rand": "randaug", "label_smoothing": "smooth", "smoothing": "smooth"}
RANDAUG_MAGNITUDE = 9  # timm's usual rand-m9-mstd0.5


def _short(value: float) -> str:
    return f"{value:g}"


def spec_text(spec: AugmentSpec) -> str:
    """``spec`` as its canonical SPEC text (``parse_augment(spec_text(s)) == s``)."""
    parts = ["flip"] if spec.flip else []
    for name in ("rotate", "color", "crop", "randaug", "mixup", "cutmix", "smooth"):
        value = getattr(spec, name)
        if value is not None and (value or name in ("crop", "randaug")):
            parts.append(f"{name}:{_short(value)}")
    return ",".join(parts)


def _value(name: str, raw: str, whole: str) -> float | int | bool:
    kind, low, high, low_open, high_open = _OPS[name]
    if kind == "flag":
        if raw:
            raise AugmentError(name, f"augment: {name} takes no value (got '{printable(whole)[:40]}'); write {name}.")
        return True
    if not raw:
        if name == "randaug":
            return RANDAUG_MAGNITUDE
        raise AugmentError(name, f"augment: {name} needs a value, e.g. {name}:{_example(name)}.")
    try:
        number = float(raw) if kind == "float" else int(raw)
    except ValueError:
        what = "a whole number" if kind == "int" else "a number"
        raise AugmentError(name, f"augment: {name} needs {what} (got '{printable(raw)[:40]}').") from None
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low) \
            or (high_open and number == high):
        lo, hi = ("(" if low_open else "[") + _short(low), _short(high) + (")" if high_open else "]")
        raise AugmentError(name, f"augment: {name} must be in {lo}, {hi} (got {printable(raw)[:40]}).")
    return number


def _example(name: str) -> str:
    return {"rotate": "15", "color": "0.3", "crop": "0.7", "mixup": "0.2", "cutmix": "1", "smooth": "0.1"}.get(name, "1")


def parse_augment(spec: str | bool | None | AugmentSpec) -> AugmentSpec:
    """The recipe a SPEC (or an old run's true/false) describes; AugmentError names the bad part.

    ``True``, ``"default"`` and ``"true"``: random resized crops of 70-100 % of the area, what
    ``augment: true`` always trained with. ``False``, ``None``, ``""``, ``"none"``: no augmentation.
    """
    if isinstance(spec, AugmentSpec):
        return spec
    if spec is None or spec is False:
        return AugmentSpec()
    if spec is True:
        return parse_augment(DEFAULT_TEXT)
    if not isinstance(spec, str):
        raise AugmentError("augment", f"augment must be a SPEC such as 'flip,crop:0.7', true or false "
                                      f"(got {printable(repr(spec))[:40]}).")
    if len(spec) > 500:
        raise AugmentError("augment", f"augment: a SPEC of {len(spec)} characters is not one; use {GRAMMAR}.")
    text = spec.strip().lower()
    if text in NONE_WORDS:
        return AugmentSpec()
    values: dict[str, Any] = {}
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        word, _, raw = token.partition(":")
        word, raw = word.strip(), raw.strip()
        if word in ("default", "true"):
            extra = {k: v for k, v in parse_augment(DEFAULT_TEXT).settings().items() if k not in values and v}
            values.update(extra)
            continue
        name = _ALIASES.get(word, word)
        if name not in _OPS:
            raise AugmentError("augment", f"augment: unknown operation '{printable(word)[:40]}' in "
                                          f"'{printable(spec)[:80]}'; use {GRAMMAR}.")
        if name in values:
            raise AugmentError(name, f"augment: {name} is given twice in '{printable(spec)[:80]}'.")
        values[name] = _value(name, raw, token)
    return replace(AugmentSpec(), **values)


def canonical(spec: str | bool | None | AugmentSpec) -> str | bool:
    """What config.json records: the canonical SPEC text, or False for none."""
    return spec_text(parse_augment(spec)) or False
