"""Hosted mode: the caps a shared Streamlit Community Cloud box needs, and how we know we are on one.

Why caps at all: on Community Cloud every user of the app shares about 2.7 GB of RAM, two cores and a
disk that is wiped on restart. One 800-epoch run, a 512 px ViT-Large or a 50,000-image folder would
take the box from everyone (and be killed half-way). So a hosted app trains at most ``epochs``
epochs, at most ``image_size`` px, on at most ``images`` images, with models of at most ``params``
parameters, and races a budget of at most ``race_s`` seconds; each refusal says the limit and what
to change. Locally nothing is capped.

How we know: ``WORKBENCH_HOSTED=1`` (or ``0``) decides; unset, the app is hosted when its code lives
under ``/mount/src/``, where Community Cloud clones every app's repository.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOUD_SOURCE_ROOT = "/mount/src/"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class HostedLimits:
    epochs: int = 30
    image_size: int = 224
    images: int = 4_000  # images a run trains and validates on (after "max images per class")
    params: int = 30_000_000  # model size: resnet50 (25.6 M) fits, ViT-Base (86 M) does not
    race_s: int = 1800  # a race holds the device for its whole budget; trainings queued behind it wait

    def lines(self) -> list[str]:
        """The caps as a person reads them (the app's banner, the CLI's help)."""
        return [f"at most {self.epochs} epochs", f"images of at most {self.image_size} px",
                f"at most {self.images:,} images per run", f"models of at most {self.params / 1e6:.0f} M parameters",
                f"races of at most {self.race_s // 60} minutes"]


LIMITS = HostedLimits()


def hosted_limits(source_file: str | Path = __file__) -> HostedLimits | None:
    """The caps when this process serves a shared box, else None (nothing capped)."""
    setting = os.environ.get("WORKBENCH_HOSTED", "").strip().lower()
    if setting in _ON:
        return LIMITS
    if setting in _OFF:
        return None
    return LIMITS if Path(source_file).resolve().as_posix().startswith(CLOUD_SOURCE_ROOT) else None


def per_class_that_fits(counts: list[int], images: int) -> int:
    """The largest "max images per class" that keeps the total of ``counts`` within ``images``."""
    low, high = 1, max(counts, default=1)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(c, mid) for c in counts) <= images:
            low = mid
        else:
            high = mid - 1
    return low
