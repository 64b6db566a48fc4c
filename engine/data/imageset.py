"""ImageSet: class names and a lazy loader per image, the one shape every dataset is read into.

Kept apart from engine.data.datasets (which reads every layout into it) so the modules that only
work on an ImageSet - the overrides applied to it, the splits drawn from it - sit below the readers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from engine.core.errors import ImageError
from engine.core.files import resolves_inside
from engine.data.images import open_image


@dataclass(frozen=True)
class FileLoader:
    """Loads one image file, bounded (engine.images.open_image); messages call it by ``name``.

    ``root_real``: the resolved dataset folder; the file is read only while it still resolves inside
    it (a file swapped for a link to outside after the folder was checked is refused, not read).
    """

    path: Path
    name: str
    root_real: str | None = None

    def __call__(self, target: int | None = None) -> Image.Image:
        if self.root_real and not resolves_inside(self.path, self.root_real):
            raise ImageError(f"{self.name}: {OUTSIDE}")
        return open_image(self.path, name=self.name, target=target)


OUTSIDE = "link to outside the dataset folder"
FOLDER_LINK = "link to a folder (links to folders are not followed)"
BROKEN_LINK = "broken link (or a link loop)"


@dataclass
class ImageSet:
    """Class names and a lazy loader per sample."""

    name: str
    class_names: list[str]
    labels: list[int]
    loaders: list[Callable[[], Image.Image]] = field(repr=False)
    sources: list[str]  # file path or "digits[17]": shown in reports and galleries
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    # the split each sample belongs to ("train" | "val" | "test") when the data names it (split folders,
    # a CSV's split column); None: a random stratified split (engine.data.splits.split_all)
    splits: list[str] | None = None
    layout_note: str = ""  # the data report's sentence: which layout was found and which split it gives
    # what the dataset's overrides file changed (engine.data.overrides.apply_overrides); {}: no decisions
    overrides: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int, target: int | None = None) -> Image.Image:
        """Sample ``i`` as RGB; files are decoded reduced to a shortest side >= ``target`` when given
        (in-memory arrays are small already and come as they are). Raises ImageError for a file
        that became unreadable since the folder was checked."""
        loader = self.loaders[i]
        return loader(target=target) if isinstance(loader, FileLoader) else loader()

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.class_names}
        for y in self.labels:
            out[self.class_names[y]] += 1
        return out
