"""A photo dataset for the 224 px benches, made offline from the photos that ship in scikit-image.

Ten classes (one source photo each: the cat, the astronaut, the coffee, the rocket ...), each image a
random crop of its photo at a random scale, flipped, colour-jittered and saved as a JPEG of a typical
web size (320 x 240 or 240 x 320). Deterministic for a seed; written once, then reused.

  python bench/photos.py [--per-class 200] [--out bench/.cache/photos] [--classes astronaut,chelsea]
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".cache" / "photos"
SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
           "ihc.png", "retina.jpg", "brick.png", "grass.png")


def _source(name: str) -> Image.Image:
    import skimage

    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")


def _sources(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The source photos of ``classes`` (their stems, e.g. "chelsea", or file names), all ten when None."""
    if classes is None:
        return SOURCES
    by_stem = {Path(name).stem: name for name in SOURCES}
    unknown = [c for c in classes if c not in by_stem and c not in SOURCES]
    if unknown or not classes:
        raise ValueError(f"unknown photo classes {unknown}; choose from {', '.join(by_stem)}")
    return tuple(by_stem.get(c, c) for c in classes)


def make_photos(out: Path = DEFAULT_OUT, per_class: int = 200, seed: int = 0,
                classes: Sequence[str] | None = None) -> Path:
    """Write ``per_class`` JPEGs per class under ``out`` (skipped when already complete); ``classes``: only
    these of the ten (stems such as "chelsea"; give each subset a folder of its own)."""
    names = _sources(classes)
    tag = "" if classes is None else "-" + "-".join(Path(name).stem for name in names)
    marker = out / f".complete-{per_class}-{seed}{tag}"
    if marker.exists():
        return out
    rng = random.Random(seed)
    for name in names:
        photo = _source(name)
        folder = out / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        w, h = photo.size
        for i in range(per_class):
            scale = rng.uniform(0.35, 0.9)
            cw, ch = int(w * scale), int(h * scale)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = photo.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
            size = (320, 240) if rng.random() < 0.7 else (240, 320)
            img = img.resize(size, Image.Resampling.BILINEAR)
            noise = np.random.default_rng(seed * 100_000 + i).normal(0, 6, (size[1], size[0], 3))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
            img.save(folder / f"{i:04d}.jpg", quality=85)
    marker.write_text("done\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--classes", help="comma-separated stems of the source photos (default: all ten)")
    args = parser.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    print(make_photos(args.out, args.per_class, classes=classes))


if __name__ == "__main__":
    main()
