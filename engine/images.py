"""Reading user images into plain 8-bit RGB, whatever they were on disk.

Models are trained on RGB; a PNG with alpha, a palette GIF, a 16-bit TIFF or a phone photo whose
pixels are stored sideways (EXIF orientation) must all reach the model as the person sees them.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import ImageError

ImageSource = Union[str, Path, bytes, BinaryIO]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white, high bit depth is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Open, fully decode and normalise one image; raise ImageError with the reason if it cannot."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "upload")
    try:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        with Image.open(source) as img:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP: the first frame
            img.load()  # decode now so truncated files fail here, not inside the model
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img).copy()
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{label}: is a folder, not an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image (or a format Pillow cannot read)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: image is too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: image is truncated or corrupt ({exc})") from exc
