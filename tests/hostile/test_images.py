"""Hostile images: every file a user could hand the app, made here at test time, one item each.

Each case states the exact outcome of the bounded open (engine.data.images.open_image), of the dataset
check (check_image) and of reading a class folder holding it (load_folder): usable, or refused
with the reason, naming the file and never a server folder, quickly. A few cases run the CLI and
the Inference page for real and measure the peak memory of ``python -m engine predict``.
"""
from __future__ import annotations

import functools
import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import ImageError
from engine.data.datasets import load_folder
from engine.data.images import MAX_ASPECT, MAX_PIXELS, check_image, open_image
from tests.conftest import ROOT

TARGET = 256  # what a 224 px model at crop 0.875 asks for
PEAK_LIMIT_MB = 1200  # torch + timm + the default model alone take most of this


# ------------------------------------------------------------------ builders (bytes, made here)
def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def solid_png(w: int, h: int) -> bytes:
    """A valid grey PNG of any size without ever holding its pixels (rows streamed into zlib):
    10000x1 is 89 bytes, 11000x11000 ~115 KB."""
    co = zlib.compressobj(9)
    row = b"\0" * (1 + w)
    body = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h and holds (almost) nothing: the classic decompression bomb header."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def bmp_header_only(w: int, h: int) -> bytes:
    """A 24-bit BMP header claiming w x h with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@functools.lru_cache(maxsize=1)
def huge_jpeg() -> bytes:
    """A real 11000x11000 JPEG (one grey, ~1.4 MB): 121 MP, only usable decoded at 1/8 (draft)."""
    return _save(Image.new("L", (11000, 11000), 140), "JPEG", quality=30)


def photo() -> Image.Image:
    import skimage

    return Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB")


def sixteen_bit(w: int = 8, h: int = 4) -> bytes:
    arr = (np.arange(w * h, dtype=np.uint32) * 65535 // max(1, w * h - 1)).astype(np.uint16).reshape(h, w)
    return _save(Image.fromarray(arr), "PNG")


def palette_transparent(fmt: str) -> bytes:
    img = Image.new("P", (60, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (30, 0, 60, 40))  # right half blue, left half index 0 (transparent)
    return _save(img, fmt, transparency=0)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 48), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated(size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    img = Image.new("RGB", size, (10, 120, 10))
    img.paste((250, 250, 250), (0, 0, size[0] // 2, size[1]))
    return _save(img, "JPEG", exif=exif)


def cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def bad_crc_png() -> bytes:
    data = bytearray(_save(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 4 + length] ^= 0xFF  # the IDAT chunk's CRC
    return bytes(data)


# ------------------------------------------------------------------ checks on the decoded image
def px(img: Image.Image, xy) -> tuple:
    return img.getpixel(xy)


def near(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def white_left_blue_right(im: Image.Image) -> bool:
    return px(im, (5, 5)) == (255, 255, 255) and px(im, (50, 5)) == (0, 0, 255)


def upright(im: Image.Image) -> bool:
    """exif_rotated stores its white half on the left; shown upright (orientation 6) it is on top."""
    w, h = im.size
    return near(px(im, (w // 2, 2)), (250, 250, 250), 20) and near(px(im, (w // 2, h - 3)), (10, 120, 10), 20)


@dataclass
class Case:
    make: Callable[[Path], Path]  # writes the file into the given class folder, returns its path
    refused: str | None = None  # the reason's phrase; None: the image is usable
    check: Callable[[Image.Image], bool] | None = None  # on open_image(path, target=...)
    target: int | None = TARGET
    folder: str | None = "same"  # what load_folder says: "same" as refused, or another phrase, or None (n/a)
    opens: bool = False  # refused by the dataset check only: the pixels themselves decode intact


def file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data() if callable(data) else data)
        return path
    return make


def fifo(folder: Path) -> Path:
    path = folder / "pipe.jpg"
    os.mkfifo(path)
    return path


def link_to(target: str, name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.symlink_to(target)
        return path
    return make


def directory(folder: Path) -> Path:
    path = folder / "x.jpg"
    path.mkdir()
    (path / "inner.txt").write_text("a folder, not a picture")
    return path


CASES: dict[str, Case] = {
    # usable, whatever the mode, and reduced to what the model needs
    "photo-png": Case(file("cat.png", lambda: _save(photo(), "PNG")), check=lambda im: min(im.size) >= 256),
    "photo-jpeg-progressive": Case(file("cat.jpg", lambda: _save(photo(), "JPEG", progressive=True)),
                                   check=lambda im: im.mode == "RGB"),
    "png-16bit-rescaled": Case(file("depth.png", sixteen_bit), target=None,
                               check=lambda im: px(im, (0, 0))[0] == 0 and px(im, (7, 3))[0] == 255),
    "png-16bit-large-reduced": Case(file("depth-big.png", lambda: sixteen_bit(4000, 3000)),
                                    check=lambda im: 256 <= min(im.size) < 600 and im.mode == "RGB"),
    "png-palette": Case(file("pal.png", lambda: _save(Image.new("RGB", (30, 20), (0, 200, 0)).convert("P"), "PNG")),
                        check=lambda im: near(px(im, (5, 5)), (0, 200, 0))),
    "png-palette-transparency": Case(file("pal-t.png", lambda: palette_transparent("PNG")), target=None,
                                     check=lambda im: white_left_blue_right(im)),
    "gif-palette-transparency": Case(file("pal-t.gif", lambda: palette_transparent("GIF")), target=None,
                                     check=lambda im: white_left_blue_right(im)),
    "jpeg-cmyk": Case(file("print.jpg", lambda: _save(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG")),
                      check=lambda im: im.mode == "RGB" and near(px(im, (10, 10)), (255, 0, 0), 30)),
    "png-la-over-white": Case(file("la.png", lambda: _save(Image.new("LA", (20, 20), (0, 0)), "PNG")),
                              check=lambda im: px(im, (3, 3)) == (255, 255, 255)),
    "png-rgba-half-transparent": Case(
        file("rgba.png", lambda: _save(Image.new("RGBA", (20, 20), (0, 0, 0, 128)), "PNG")),
        check=lambda im: near(px(im, (3, 3)), (127, 127, 127), 2)),
    "webp-rgba-lossless": Case(file("a.webp", lambda: _save(Image.new("RGBA", (40, 40), (0, 0, 255, 0)), "WEBP",
                                                             lossless=True)),
                               check=lambda im: px(im, (3, 3)) == (255, 255, 255)),
    "gif-animated-first-frame": Case(file("anim.gif", lambda: animated("GIF")),
                                     check=lambda im: im.size == (64, 48) and near(px(im, (5, 5)), (250, 0, 0), 20)),
    "webp-animated-first-frame": Case(file("anim.webp", lambda: animated("WEBP")),
                                      check=lambda im: im.size == (64, 48) and near(px(im, (5, 5)), (250, 0, 0), 20)),
    "jpeg-exif-rotated": Case(file("phone.jpg", lambda: exif_rotated((40, 20))), target=None,
                              check=lambda im: im.size == (20, 40) and upright(im)),
    "jpeg-exif-rotated-reduced": Case(file("phone-big.jpg", lambda: exif_rotated((4000, 2000))),
                                      check=lambda im: 256 <= im.width < im.height <= 1000 and upright(im)),
    "tiff-float": Case(file("f.tif", lambda: _save(Image.fromarray(np.linspace(0, 1, 48, np.float32).reshape(6, 8)),
                                                   "TIFF")), check=lambda im: im.size == (8, 6)),
    "bmp-1bit": Case(file("bw.bmp", lambda: _save(Image.new("1", (33, 17), 1), "BMP")),
                     check=lambda im: px(im, (0, 0)) == (255, 255, 255)),
    "png-1x1": Case(file("dot.png", lambda: _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
                    check=lambda im: im.size == (1, 1)),
    "png-thin-at-the-limit": Case(file("strip.png", lambda: solid_png(20 * 50, 50)),
                                  check=lambda im: im.size == (1000, 50)),
    "jpeg-11000x11000-reduced": Case(file("huge.jpg", huge_jpeg), check=lambda im: 256 <= min(im.size) <= 1375),
    # refused by the header alone, before any decoding
    "png-10000x1": Case(file("thin.png", lambda: solid_png(10000, 1)), "extreme aspect ratio 10000:1"),
    "png-1x10000": Case(file("tall.png", lambda: solid_png(1, 10000)), "extreme aspect ratio 10000:1"),
    "png-40000x1": Case(file("thinner.png", lambda: solid_png(40000, 1)), "extreme aspect ratio 40000:1"),
    "png-21x1": Case(file("just-over.png", lambda: solid_png(21, 1)), "extreme aspect ratio 21:1"),
    "png-11000x11000": Case(file("huge.png", lambda: solid_png(11000, 11000)), "too large: 11000x11000 pixels"),
    "png-header-40000x40000": Case(file("bomb.png", lambda: png_header_only(40000, 40000)),
                                   "too large: 1,600,000,000 pixels"),
    "bmp-header-8000x8000": Case(file("big.bmp", lambda: bmp_header_only(8000, 8000)), "too large: 8000x8000 pixels"),
    "png-zero-width": Case(file("zero.png", lambda: png_header_only(0, 10)), "not an image"),
    "jpeg-11000x11000-full-size": Case(file("huge-full.jpg", huge_jpeg), "too large: 11000x11000 pixels",
                                       target=None, folder=None),
    # broken files
    "jpeg-truncated": Case(file("cut.jpg", lambda: cut(_save(photo(), "JPEG"), 0.5)), "truncated or corrupt"),
    "png-truncated": Case(file("cut.png", lambda: cut(_save(photo(), "PNG"), 0.5)), "truncated or corrupt"),
    # a chunk checksum only verify() reads; zlib's own checksum vouches for the pixels, so a single
    # prediction may use it, but a dataset (read many times, for hours) skips it
    "png-bad-crc": Case(file("crc.png", bad_crc_png), "truncated or corrupt", opens=True),
    "zero-length": Case(file("empty.jpg", b""), "empty file"),
    "text-renamed-jpg": Case(file("notes.jpg", b"shopping list: milk, eggs\n"), "not an image"),
    "html-renamed-png": Case(file("page.png", b"<!doctype html><html><body>hi</body></html>"), "not an image"),
    "svg-renamed-png": Case(file("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
                            "not an image"),
    "eps-renamed-jpg": Case(file("print.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
                            "not an image"),  # Pillow would run Ghostscript for EPS: not a format we open
    # not files at all
    "fifo": Case(fifo, "not a regular file"),
    "symlink-to-dev-zero": Case(link_to("/dev/zero", "zero.jpg"), "not a regular file",
                                folder="link to outside the dataset folder"),
    "symlink-to-dev-null": Case(link_to("/dev/null", "null.png"), "not a regular file",
                                folder="link to outside the dataset folder"),
    "directory-named-x.jpg": Case(directory, "is a folder, not an image", folder=None),
    "missing-file": Case(lambda folder: folder / "gone.png", "file not found", folder=None),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case_id", list(CASES))
def test_hostile_image(tmp_path, case_id):
    case = CASES[case_id]
    root = tmp_path / "dataset"
    (root / "good").mkdir(parents=True)
    (root / "good" / "a.png").write_bytes(_save(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    (root / "case").mkdir()
    path = case.make(root / "case")
    started = time.monotonic()
    if case.opens:
        assert open_image(path, target=case.target).size == (40, 30)
        assert case.refused in (check_image(path) or ""), check_image(path)
    elif case.refused is None:
        img = open_image(path, target=case.target)
        assert img.mode == "RGB", img.mode
        assert case.check is None or case.check(img), (img.size, img.mode)
        assert check_image(path) is None
    else:
        with pytest.raises(ImageError) as info:
            open_image(path, target=case.target)
        message = str(info.value)
        assert message.startswith(f"{path.name}: ") and case.refused in message, message
        assert str(tmp_path) not in message, message  # the file's name, never a server folder
        with pytest.raises(ImageError, match="^my upload: "):  # an explicit name wins over the path
            open_image(path, name="my upload", target=case.target)
        if case.target is not None or case.folder is not None:  # what a dataset check says
            assert case.refused in (check_image(path) or ""), check_image(path)
    if case.folder is not None:
        ds = load_folder(root)
        reasons = dict(ds.skipped)
        rel = f"case/{path.name}"
        if case.refused is None:
            assert str(path) in ds.sources and rel not in reasons, reasons
        else:
            expected = case.refused if case.folder == "same" else case.folder
            assert expected in reasons.get(rel, ""), reasons
            assert str(path) not in ds.sources
    assert time.monotonic() - started < 20, "bounded work, no hang"


def test_the_limits_are_sane():
    """50 MP and 20:1: a 48 MP phone photo and a 10:1 panorama pass, the attacks above do not."""
    assert 48_000_000 <= MAX_PIXELS <= 100_000_000 and 10 <= MAX_ASPECT <= 32


def test_truncated_images_are_never_loaded_leniently():
    """A half-decoded image would train on grey garbage: nothing in the app turns this on."""
    from PIL import ImageFile

    import engine.cli  # noqa: F401
    import engine.outputs.explain  # noqa: F401
    import engine.training.loop  # noqa: F401
    import ui.errors  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------------------ predict: several uploads at once
@pytest.fixture(scope="module")
def tiny_handle():
    from engine.models.factory import create_model

    return create_model("timm:test_efficientnet", weights="none", class_names=["a", "b", "c"])


def test_predict_sources_runs_the_whole_corpus_in_one_call(tmp_path, tiny_handle):
    """Every case above as one upload batch: each refused one gets its own reason, every usable one
    a top-k and a small preview, in upload order (batches of 4, so batching is crossed too)."""
    from engine.outputs.predict import predict_sources

    folder = tmp_path / "in"
    folder.mkdir()
    sources, expected = [], []
    for case_id, case in CASES.items():
        if case.target is None and case.refused:  # a full-size-only refusal: predict always reduces
            continue
        sub = folder / case_id
        sub.mkdir()
        sources.append((case_id, case.make(sub)))
        expected.append(case.refused)
    results = predict_sources(tiny_handle, sources, top_k=2, batch_size=4, preview=64)
    assert [r.file for r in results] == [name for name, _ in sources]
    for r, refused in zip(results, expected):
        if refused is None or CASES[r.file].opens:
            assert r.error is None and len(r.topk) == 2 and max(r.preview.size) <= 64, (r.file, r.error)
        else:
            assert r.topk is None and refused in r.error and r.preview is None, (r.file, r.error)


def test_two_uploads_with_the_same_name_keep_their_own_result(default_handle, cat_photo, coffee_photo):
    from engine.outputs.predict import predict_sources

    results = predict_sources(default_handle, [("image.png", cat_photo.read_bytes()),
                                               ("image.png", coffee_photo.read_bytes())], top_k=1)
    assert [r.file for r in results] == ["image.png", "image.png"]
    assert "cat" in results[0].topk[0].label.lower() and "espresso" in results[1].topk[0].label.lower()


def test_one_bad_upload_among_good_ones(default_handle, cat_photo):
    from engine.outputs.predict import predict_sources

    good = cat_photo.read_bytes()
    results = predict_sources(default_handle, [("a.png", good), ("bad.png", solid_png(10000, 1)), ("b.png", good)],
                              top_k=3)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error == "extreme aspect ratio 10000:1 (limit 20:1)"  # the file is in .file
    assert results[0].topk == results[2].topk
    assert set(results[1].to_dict()) == {"file", "topk", "error"} and "preview" not in results[0].to_dict()


def test_grad_cam_of_a_large_image_costs_what_the_model_needs(tiny_handle):
    from engine.outputs.explain import grad_cam

    result = grad_cam(tiny_handle, Image.new("RGB", (6000, 4000), (30, 60, 90)))
    assert result.overlay.size == (tiny_handle.spec.input_size[-1],) * 2


# ------------------------------------------------------------------ the Inference page
def test_inference_page_renders_every_kind_of_upload(tmp_path, monkeypatch, cat_photo):
    """16-bit, palette, CMYK, alpha, animated, thin, huge, broken and two files of the same name:
    each usable one has its own thumbnail and chart, each bad one one line; no traceback."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = AppTest.from_file(str(ROOT / "views" / "inference.py"), default_timeout=180)
    at.session_state["active_model"] = "timm:test_efficientnet"
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = 3
    at.run()
    good = [("same.png", cat_photo.read_bytes()), ("same.png", sixteen_bit(64, 48)),
            ("palette.png", palette_transparent("PNG")),
            ("cmyk.jpg", _save(Image.new("CMYK", (90, 60), (0, 255, 255, 0)), "JPEG")),
            ("alpha.png", _save(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG")),
            ("anim.gif", animated("GIF")), ("huge.jpg", huge_jpeg())]
    bad = [("thin.png", solid_png(10000, 1)), ("huge.png", solid_png(11000, 11000)), ("broken.png", b"\x89PNG nope")]
    at.file_uploader[0].set_value([(n, d, "image/png") for n, d in good + bad]).run()
    assert not at.exception, at.exception
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert captions == [n for n, _ in good], captions
    assert len(at.get("plotly_chart")) == len(good)
    table = at.dataframe[0].value
    assert list(table["file"]) == [n for n, _ in bad]
    assert [r.split(" (")[0] for r in table["reason"]] == [
        "extreme aspect ratio 10000:1", "too large: 11000x11000 pixels", "not an image"]
    text = " ".join(str(e.value) for kind in ("warning", "error") for e in getattr(at, kind))
    assert "Traceback" not in text and str(tmp_path) not in text


# ------------------------------------------------------------------ the CLI, peak memory measured
# Linux copies the forking process's peak RSS into the child's ru_maxrss at exec, so a child of
# this (big) pytest process would report pytest's own peak. A small launcher starts the engine and
# reports that one child's peak (RUSAGE_CHILDREN of a process with a single child).
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
             "sys.exit(rc)")


def _run_measured(args: list[str], timeout: float = 240, python_args: bool = False) -> tuple[int, str, str, float]:
    """Run ``python -m engine ARGS`` (``python ARGS`` with ``python_args``); (exit code, stdout, stderr,
    peak RSS in MB of that process alone)."""
    command = [sys.executable, *([] if python_args else ["-m", "engine"]), *args]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "maxrss"
        proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, str(report), *command],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the engine under it
            proc.communicate()
            raise
        return proc.returncode, out, err, int(report.read_text()) / 1024


EXTREME = {"thin-10000x1.png": lambda: solid_png(10000, 1), "thin-40000x1.png": lambda: solid_png(40000, 1),
           "huge-11000x11000.png": lambda: solid_png(11000, 11000), "huge-11000x11000.jpg": huge_jpeg}


@pytest.fixture(scope="module")
def predicted_extremes(tmp_path_factory):
    """One ``python -m engine predict`` of the default model over all four extreme images."""
    folder = tmp_path_factory.mktemp("extreme")
    paths = []
    for name, make in EXTREME.items():
        (folder / name).write_bytes(make())
        paths.append(str(folder / name))
    rc, out, err, peak = _run_measured(["predict", *paths, "--top-k", "1"])
    lines = {line.split(":")[0].split("/")[-1]: line for line in out.splitlines() if not line.startswith(" ")}
    return rc, out, err, peak, lines


@pytest.mark.parametrize("name,outcome", [
    ("thin-10000x1.png", "thin-10000x1.png: ERROR extreme aspect ratio 10000:1 (limit 20:1)"),
    ("thin-40000x1.png", "thin-40000x1.png: ERROR extreme aspect ratio 40000:1 (limit 20:1)"),
    ("huge-11000x11000.png", "huge-11000x11000.png: ERROR too large: 11000x11000 pixels (limit 50 MP)"),
    ("huge-11000x11000.jpg", None),
])
def test_cli_predict_extreme_image(predicted_extremes, name, outcome):
    rc, out, err, _peak, lines = predicted_extremes
    assert "Traceback" not in out + err and rc == 1, (rc, err[-2000:])
    line = lines[name]
    if outcome is None:
        assert "ERROR" not in line and line.endswith(name)  # predicted, its top-1 on the next line
    else:
        assert line.endswith(outcome), line


def test_cli_predict_extreme_images_peak_memory(predicted_extremes):
    _rc, _out, _err, peak, _lines = predicted_extremes
    print(f"peak RSS of predict over the extreme images: {peak:.0f} MB")
    if peak >= PEAK_LIMIT_MB:  # say how much of it the libraries alone take on this machine
        rc, _o, _e, imports = _run_measured(["-c", "import torch, timm, torchvision"], python_args=True)
        pytest.fail(f"{peak:.0f} MB (import torch, timm, torchvision alone: {imports:.0f} MB, exit {rc})")


# ------------------------------------------------------------------ the Evaluate page
def test_evaluate_page_with_a_file_broken_since_training_and_a_hostile_grad_cam_upload(tmp_path, monkeypatch):
    """A folder run whose validation file is truncated while it is evaluated: the page says so in one
    line and shows the rest; a 10000x1 upload for Grad-CAM is one error box, never a traceback."""
    from streamlit.testing.v1 import AppTest

    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    root = tmp_path / "data" / "colours"
    for cls, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.png").write_bytes(_save(Image.new("RGB", (24, 16), tuple(c + 5 * i for c in colour)),
                                                        "PNG"))
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(root), image_size=32, epochs=1,
                         num_workers=0, val_fraction=0.5, plan=FreezePlan.full(head_lr=1e-3).to_dict())
    run = create_run(tmp_path / "runs", config.to_dict())
    fit(config, run)
    import engine.data.datasets
    from engine.data.datasets import load_source
    from engine.data.splits import split_indices

    ds = load_source(str(root))
    victim = Path(ds.sources[split_indices(ds, config)[1][0]])
    data = victim.read_bytes()
    victim.write_bytes(data[:data.index(b"IDAT") + 8])  # cut inside the pixel data
    # the file breaks between the folder check and the read (a race a test can only stage): had it
    # broken before the check, the check would skip it and the recomputed split would shift
    checked = engine.data.datasets.check_image
    monkeypatch.setattr(engine.data.datasets, "check_image", lambda p, name=None: None if Path(p) == victim else checked(p))

    at = AppTest.from_file(str(ROOT / "views" / "evaluate.py"), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    warnings_ = [w.value for w in at.warning]
    assert any("1 validation file(s) can no longer be read" in w and f"{victim.parent.name}/{victim.name}: "
               "truncated or corrupt" in w for w in warnings_), warnings_
    next(r for r in at.radio if r.label == "Image").set_value("upload").run()
    at.file_uploader[0].set_value(("thin.png", solid_png(10000, 1), "image/png")).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert errors == ["thin.png: extreme aspect ratio 10000:1 (limit 20:1)"], errors
    text = " ".join(str(e.value) for kind in ("warning", "error", "caption") for e in getattr(at, kind))
    assert "Traceback" not in text and str(tmp_path) not in text
