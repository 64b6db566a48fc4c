"""Images of any mode reach the model as RGB the way a person sees them; bad files say why."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import ImageError
from engine.data.images import open_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (8, 6), (200, 30, 30))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.arange(48).reshape(6, 8) * 1000).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]),
    )
    out = open_image(_png(img) if mode not in ("CMYK", "F", "I") else _tiff(img))
    assert out.mode == "RGB" and out.size == (8, 6)


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.array([[0, 65535]], dtype=np.uint16)
    out = open_image(_png(Image.fromarray(arr)))
    assert np.asarray(out)[0, 0, 0] == 0 and np.asarray(out)[0, 1, 0] == 255


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(open_image(_png(img))).min() == 255


def test_exif_orientation_is_respected():
    img = Image.new("RGB", (40, 20), (10, 120, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (5, 5), i) for i in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert open_image(buf.getvalue()).size == (5, 5)


def test_not_an_image_and_truncated_files(tmp_path, cat_photo):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="not an image"):
        open_image(text)
    data = cat_photo.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(cut)
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "missing.png")
