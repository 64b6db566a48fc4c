"""Reading user images into plain 8-bit RGB, whatever they were on disk, without hurting the server.

Models are trained on RGB; a PNG with alpha, a palette GIF, a 16-bit TIFF or a phone photo whose
pixels are stored sideways (EXIF orientation) must all reach the model as the person sees them.

Every image here is untrusted and the server is small and shared, so nothing is decoded before its
header has been checked: a 111-byte PNG can claim 10000x1 or 40000x40000 pixels, and a "file" can
be a FIFO (reading it blocks forever) or /dev/zero (never ends). Callers say how small an image
they need (``target``, the shortest side) and get a reduced decode: JPEG through libjpeg's DCT
scaling (``draft``), other formats through ``Image.reduce`` right after decoding, before any
conversion to a wider mode. Truncated files always fail (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never set here and must stay False: a half-grey image would silently train the model on garbage).
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from engine.core.errors import ImageError

ImageSource = Union[str, Path, bytes, BinaryIO]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# 50 MP: every common camera fits (a 48/50 MP phone sensor is 8000x6000 = 48 MP), and the worst
# full decode stays ~200 MB (4 bytes a pixel: RGBA, 32-bit grey) on a ~2.7 GB server where torch
# and a model already take ~0.85 GB. JPEGs are measured after DCT scaling (draft), so a 100 MP
# phone JPEG is still accepted when the caller asks for a model-sized image (it decodes at 1/8).
MAX_PIXELS = 50_000_000
# 20:1: phone panoramas are ~4:1 to 10:1 and pass; a 10000x1 strip does not. The bound also caps
# what resize-the-shortest-side transforms make (timm's eval transform turns 10000x1 into 960000x96
# float pixels, ~3.5 GB; at 20:1 a 256 px shortest side gives at most 256x5120).
MAX_ASPECT = 20
# Formats a user may give (the upload widgets' list plus TIFF); anything else Pillow knows (EPS,
# which runs Ghostscript, PSD, ICO ...) is "not an image" here. Phones' multi-picture JPEGs (MPO)
# open through the JPEG entry.
# Pillow warns on stderr about odd files (corrupt EXIF, palette transparency ...), naming its own
# source files on the server. Those are not messages for a user: this module refuses or repairs
# such files itself and says so in one line.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# check_image decodes at about this shortest side: every byte of the file is still decompressed
# (so truncation is caught) but JPEG skips most of the work and nothing large is allocated.
CHECK_TARGET = 32

_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TRANSPOSE = {  # EXIF orientation -> the transposition that shows the image upright (as ImageOps)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Refused(Exception):
    """Internal: the short reason an image cannot be used (open_image adds the file name)."""


def _label(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, Path)):
        return Path(source).name
    own = getattr(source, "name", None)  # an open file or an upload knows its name
    return Path(own).name if isinstance(own, str) and own else "upload"


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.1f}".rstrip("0").rstrip(".")


def _open_regular(path: Path) -> BinaryIO:
    """A regular file opened for reading, or _Refused. FIFOs, devices and sockets are refused from
    ``os.stat`` alone, before any open (a FIFO blocks the opener until a writer comes); the open is
    non-blocking and re-checked with ``fstat`` in case the path was swapped in between."""
    try:
        info = os.stat(path)  # follows links: a link to /dev/zero is a character device here
    except FileNotFoundError:
        raise _Refused("file not found") from None
    except NotADirectoryError:
        raise _Refused("file not found") from None
    except (OSError, ValueError) as exc:  # permission, ELOOP, name too long, NUL byte
        raise _Refused(f"cannot be read ({getattr(exc, 'strerror', None) or 'invalid name'})") from None
    if stat.S_ISDIR(info.st_mode):
        raise _Refused("is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise _Refused("not a regular file")
    if info.st_size == 0:
        raise _Refused("empty file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _Refused(f"cannot be read ({exc.strerror or 'error'})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Refused("not a regular file")
    return os.fdopen(fd, "rb")


def _stream(source: ImageSource) -> BinaryIO:
    if isinstance(source, (str, Path)):
        return _open_regular(Path(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _Refused("empty file")
        return io.BytesIO(bytes(source))
    try:  # an open file or an upload (Streamlit's UploadedFile is a BytesIO); Pillow reads from 0
        start = source.tell()
        empty = source.seek(0, io.SEEK_END) == 0
        source.seek(start)
    except (AttributeError, OSError, ValueError):
        empty = False
    if empty:
        raise _Refused("empty file")
    return source


def _open(stream: BinaryIO) -> Image.Image:
    """Pillow's lazy open: reads the header only."""
    try:
        with warnings.catch_warnings():
            # 89-179 MP warns in Pillow; our own limits below decide, with a clearer message. (Not
            # thread-safe before Python 3.14: at worst the ignore outlives the call, which is harmless.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream, formats=FORMATS)
    except UnidentifiedImageError:
        raise _Refused("not an image") from None
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (~179 MP), header only
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise _Refused(f"too large: {size} (limit {MAX_PIXELS // 1_000_000} MP)") from None
    except Exception:  # noqa: BLE001 - a hostile header can raise anything inside a Pillow plugin
        raise _Refused("truncated or corrupt") from None


def _check_header(img: Image.Image, target: int | None) -> None:
    """Refuse by the header alone, then shrink JPEG decoding (draft) when a target is given."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _Refused(f"zero-sized image ({w}x{h})")
    ratio = max(w, h) / min(w, h)
    if ratio > MAX_ASPECT:
        raise _Refused(f"extreme aspect ratio {_ratio_text(ratio)}:1 (limit {MAX_ASPECT}:1)")
    if target and isinstance(img, JpegImageFile):
        scale = max(1.0, min(w, h) / target)
        img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))  # shortest side stays >= target
    dw, dh = img.size  # what will really be decoded
    if dw * dh > MAX_PIXELS:
        raise _Refused(f"too large: {w}x{h} pixels (limit {MAX_PIXELS // 1_000_000} MP)")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not refuse a good picture: shown as stored
        return 1


def _reduce(img: Image.Image, target: int | None) -> Image.Image:
    """Shrink by a whole factor keeping the shortest side >= target, in the narrowest mode that can
    be averaged (palette indices cannot: those become RGB(A)/L first)."""
    factor = min(img.size) // target if target else 1
    if factor < 2:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode.startswith("I;16"):  # reduce() has no 16-bit path; a box resize is the same average
        return img.resize((-(-img.width // factor), -(-img.height // factor)), Image.Resampling.BOX)
    return img.reduce(factor)


def shrink_to(img: Image.Image, target: int) -> Image.Image:
    """An already decoded RGB image reduced by a whole factor to a shortest side >= ``target`` (the
    same image when it is small enough): for PIL images handed in from elsewhere, so a transform
    never resizes more pixels than it needs."""
    factor = min(img.size) // target if target else 1
    return img.reduce(factor) if factor >= 2 else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white, high bit depth is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float32)  # after _reduce: small
        finite = np.isfinite(arr)
        arr = np.where(finite, arr, 0.0)  # NaN/inf pixels of float images read as black
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        with np.errstate(over="ignore", invalid="ignore"):  # huge finite ranges saturate, by design
            arr8 = np.nan_to_num((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # over white, by its alpha: no full-size RGBA copies
        return out
    return img.convert("RGB")


def _decode(source: ImageSource, target: int | None) -> Image.Image:
    stream = _stream(source)
    owned = stream is not source
    try:
        img = _open(stream)
        out: Image.Image | None = None
        try:
            _check_header(img, target)
            try:
                img.load()  # frame 0 of an animation; truncated data raises here
                orientation = _orientation(img)
                out = _to_rgb(_reduce(img, target))
                if orientation in _TRANSPOSE:
                    out = out.transpose(_TRANSPOSE[orientation])
            except MemoryError:
                raise _Refused("too large to decode") from None
            except _Refused:
                raise
            except Exception:  # noqa: BLE001 - OSError, SyntaxError, ValueError, struct.error ...
                raise _Refused("truncated or corrupt") from None
            return out  # loaded: its pixels stay when the file closes below (no full-size copy)
        finally:
            if out is not img:
                img.close()  # the full-size decode, released now rather than at garbage collection
    finally:
        if owned:
            stream.close()


def open_image(source: ImageSource, name: str | None = None, *, target: int | None = None) -> Image.Image:
    """Open, check, decode and normalise one image to RGB, or raise ImageError with the reason.

    ``target``: the shortest side the caller needs (e.g. ``ceil(image_size / crop_pct)``); the image
    is then decoded reduced, never below it. None decodes at full size (still within MAX_PIXELS).
    ``name`` is what messages call the file (default: a path's file name, or "upload"), so they never
    show a server folder.
    """
    try:
        return _decode(source, target)
    except _Refused as exc:
        raise ImageError(f"{_label(source, name)}: {exc}") from None


def check_image(source: ImageSource, name: str | None = None) -> str | None:
    """None if the image is usable, else a short reason ("truncated or corrupt", "not an image" ...).

    The validation run when a dataset is read: a reduced but real decode (truncation shows only when
    decoding) plus Pillow's ``verify()`` (chunk checksums, which a decode may skip). Cheap on big
    folders: JPEGs decode at 1/8 scale. ``name`` is unused in the reason (callers list the file).
    """
    try:
        _decode(source, CHECK_TARGET)
        stream = _stream(source)
        try:
            with _open(stream) as img:
                img.verify()
        finally:
            if stream is not source:
                stream.close()
    except _Refused as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - verify() raises SyntaxError, OSError, struct.error ...
        return "truncated or corrupt"
    return None
