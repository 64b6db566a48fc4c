#!/usr/bin/env python3
"""Top-k classes for image files with an ONNX model exported by the transfer-learning workbench.

    python predict_onnx.py photo.jpg other.png [--model model.onnx] [--top-k 5] [--json]

Needs only onnxruntime, numpy and pillow (no torch). Everything the model expects is read from the
ONNX file's metadata (``class_names`` and ``preprocessing``, both JSON), and applied exactly as the
workbench's eval transform does: the image decoded reduced to what the model needs (JPEG DCT scaling,
then a whole-factor reduce), transparency over white, EXIF orientation applied, RGB; the shortest side
resized to floor(size / crop_pct) with the model's interpolation (torchvision's Resize rounding), a
center crop (torchvision's CenterCrop rounding), pixels / 255, (x - mean) / std, NCHW float32.
Without --model, the only .onnx file beside this script is used.

A calibrated run's file also says its ``temperature`` (the logits are divided by it before the softmax,
as the workbench shows its probabilities) and its ``open_set`` rule: the model then has a second output,
each image's distance to its nearest training image, and an image above the rule's threshold is
reported ``"unknown": true`` (none of the model's classes; its top-k still names the nearest), exactly as
``python -m engine predict --run RUN --json`` does. ``--open-set off`` leaves it out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import ExifTags, Image
from PIL.JpegImagePlugin import JpegImageFile

INTERPOLATION = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                 "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
MAX_PIXELS = 50_000_000  # decoded pixels, after JPEG DCT scaling
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what the workbench reads (engine/data/images.py)
MAX_ASPECT = 20


def read_rules(session: ort.InferenceSession) -> tuple[float | None, dict | None]:
    """The temperature (None: not calibrated) and the open-set rule (None: none inside this file), each
    checked: a value that is not a usable number is not used."""
    meta = session.get_modelmeta().custom_metadata_map
    try:
        temperature = float(meta["temperature"]) if "temperature" in meta else None
    except ValueError:
        temperature = None
    if temperature is not None and not 0.0 < temperature < float("inf"):
        temperature = None
    try:
        rule = json.loads(meta.get("open_set", "null"))
    except ValueError:
        rule = None
    outputs = [o.name for o in session.get_outputs()]
    if not (isinstance(rule, dict) and rule.get("exported") and rule.get("output") in outputs
            and isinstance(rule.get("threshold"), (int, float)) and not isinstance(rule.get("threshold"), bool)):
        rule = None
    return temperature, rule


def read_metadata(session: ort.InferenceSession) -> tuple[list[str], dict]:
    """The class names and preprocessing the exporter stored in the model."""
    meta = session.get_modelmeta().custom_metadata_map
    if "class_names" not in meta or "preprocessing" not in meta:
        raise SystemExit("error: this ONNX file has no workbench metadata (class_names, preprocessing)")
    return json.loads(meta["class_names"]), json.loads(meta["preprocessing"])


# ---------------------------------------------------------------- decoding (as engine/data/images.py)
def _reduce(img: Image.Image, target: int) -> Image.Image:
    factor = min(img.size) // target if target else 1
    if factor < 2:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode.startswith("I;16"):
        return img.resize((-(-img.width // factor), -(-img.height // factor)), Image.Resampling.BOX)
    return img.reduce(factor)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # high bit depth: min..max -> 0..255
        arr = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(arr)
        arr = np.where(finite, arr, 0.0)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            arr8 = np.nan_to_num((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # transparency over white
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")


FILE_TYPE_BITS, REGULAR_FILE = 0o170000, 0o100000  # st_mode's file type, and a regular file's (stat.S_IFREG)


def check_regular(path: str | Path) -> None:
    """ValueError unless ``path`` is a non-empty regular file. A FIFO named like an image blocked the
    script forever (opening one waits for a writer): pipes, devices, sockets and folders are refused
    from their status alone, before any open. Links are followed: a link to a pipe is a pipe here."""
    try:
        info = Path(path).stat()
    except (OSError, ValueError) as exc:  # missing, not allowed, a NUL in the name
        raise ValueError(f"cannot be read ({getattr(exc, 'strerror', None) or 'invalid name'})") from None
    if info.st_mode & FILE_TYPE_BITS != REGULAR_FILE:
        raise ValueError("not a regular file (a folder, pipe, device or socket)")
    if info.st_size == 0:
        raise ValueError("empty file")


def _open_header(path: str | Path) -> Image.Image:
    """Pillow's lazy open of a regular file (the header only). Pillow's own bomb limit (~179 MP) is
    reported like MAX_PIXELS, which is checked before anything is decoded."""
    check_regular(path)
    try:
        return Image.open(path, formats=FORMATS)
    except Image.DecompressionBombError as exc:
        pixels = str(exc).partition("(")[2].partition(" pixels")[0]
        size = f"{int(pixels):,} pixels" if pixels.isdigit() else "too many pixels"
        raise ValueError(f"too large: {size} (limit {MAX_PIXELS // 1_000_000} MP)") from None


def load_image(path: str | Path, target: int) -> Image.Image:
    """An upright RGB image whose shortest side is at least ``target`` (decoded no larger than needed):
    a regular file only, its pixel count checked from the header before anything is decoded."""
    with _open_header(path) as img:
        w, h = img.size
        if min(w, h) <= 0 or max(w, h) / min(w, h) > MAX_ASPECT:
            raise ValueError(f"unusable size {w}x{h}")
        if target and isinstance(img, JpegImageFile):
            scale = max(1.0, min(w, h) / target)
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise ValueError(f"too large: {w}x{h} pixels (limit {MAX_PIXELS // 1_000_000} MP)")
        img.load()
        try:
            orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
        except Exception:  # noqa: BLE001 - broken EXIF: shown as stored
            orientation = 1
        out = _to_rgb(_reduce(img, target))
        if orientation in TRANSPOSE:
            out = out.transpose(TRANSPOSE[orientation])
        return out if out is not img else img.copy()


# ---------------------------------------------------------------- the eval transform (timm + torchvision)
def _resize(img: Image.Image, prep: dict) -> Image.Image:
    """torchvision's Resize on a PIL image: the shortest side to ``resize_size``, the other side
    int(size * long / short); or both sides given (squash / keep-ratio)."""
    resample = INTERPOLATION[prep["interpolation"]]
    w, h = img.size
    size = prep["resize_size"]
    mode = prep["crop_mode"]
    if mode == "squash":
        new_h, new_w = size
    elif mode == "center" and size[0] == size[1]:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size[0], int(size[0] * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    elif mode == "center":  # timm's ResizeKeepRatio (shortest edge to its target, non-square input)
        ratio = min(h / size[0], w / size[1])
        new_h, new_w = round(h / ratio), round(w / ratio)
    else:
        raise SystemExit(f"error: crop mode {mode!r} is not supported by this script")
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, crop_h: int, crop_w: int) -> Image.Image:
    """torchvision's CenterCrop: pad with black when smaller, then int(round((size - crop) / 2))."""
    w, h = img.size
    if crop_w > w or crop_h > h:
        left, top = max(0, (crop_w - w) // 2), max(0, (crop_h - h) // 2)
        padded = Image.new(img.mode, (w + left + max(0, (crop_w - w + 1) // 2), h + top + max(0, (crop_h - h + 1) // 2)))
        padded.paste(img, (left, top))
        img, (w, h) = padded, padded.size
        if (w, h) == (crop_w, crop_h):
            return img
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def preprocess(img: Image.Image, prep: dict) -> np.ndarray:
    """(3, H, W) float32, as the model's eval transform gives it."""
    _, crop_h, crop_w = prep["input_size"]
    img = _center_crop(_resize(img, prep), crop_h, crop_w)
    x = np.asarray(img, dtype=np.float32) / np.float32(prep["scale"])  # H, W, 3 in 0..1
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(session: ort.InferenceSession, paths: list[str], top_k: int = 5, batch: int = 16,
            open_set: bool = True) -> list[dict]:
    """One result per path: ``{"file", "topk": [{"label", "index", "prob"}]}`` (with ``temperature`` and
    ``unknown``, ``unknown_score``, ``unknown_threshold`` when the file carries them) or ``{"file", "error"}``."""
    names, prep = read_metadata(session)
    temperature, rule = read_rules(session)
    rule = rule if open_set else None
    outputs = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    k = max(1, min(top_k, len(names)))
    results: list[dict] = []
    for start in range(0, len(paths), batch):
        rows, arrays = [], []
        for path in paths[start:start + batch]:
            result: dict = {"file": str(path)}
            results.append(result)
            try:
                arrays.append(preprocess(load_image(path, prep["decode_target"]), prep))
                rows.append(result)
            except Exception as exc:  # noqa: BLE001 - one bad file does not stop the others
                result["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for i in range(0, len(arrays), fixed or len(arrays) or 1):
            chunk = arrays[i:i + (fixed or len(arrays))]
            x = np.stack(chunk + [chunk[-1]] * ((fixed or len(chunk)) - len(chunk)))  # pad a fixed batch
            got = session.run(None, {inp.name: x})
            logits = got[0][:len(chunk)]
            probs = softmax(logits / temperature if temperature else logits)
            scores = got[outputs.index(rule["output"])][:len(chunk)] if rule else None
            for n, (result, p) in enumerate(zip(rows[i:i + len(chunk)], probs)):
                order = np.argsort(-p, kind="stable")[:k]
                result["topk"] = [{"label": names[j], "index": int(j), "prob": float(p[j])} for j in order]
                if temperature:
                    result["temperature"] = temperature
                if rule:
                    score = float(scores[n])
                    result.update(unknown=score > rule["threshold"], unknown_score=score,
                                  unknown_threshold=float(rule["threshold"]))
    return results


def _default_model() -> Path:
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("*.onnx"))
    if len(found) != 1:
        raise SystemExit(f"error: {'no' if not found else 'several'} .onnx files beside {Path(__file__).name}; "
                         "name one with --model")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-k classes for images with a workbench ONNX model.")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", help="the .onnx file (default: the only one beside this script)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--open-set", choices=("on", "off"), default="on",
                        help="say when an image is none of the classes (when the model carries the rule)")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else _default_model()
    try:
        check_regular(model)  # a pipe named model.onnx would block onnxruntime's read forever
    except ValueError as exc:
        raise SystemExit(f"error: {model}: {exc}") from None
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    results = predict(session, args.images, top_k=args.top_k, open_set=args.open_set == "on")
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: error: {r['error']}", file=sys.stderr)
            else:
                unknown = "UNKNOWN (none of the classes), nearest: " if r.get("unknown") else ""
                print(f"{r['file']}: {unknown}" + ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["topk"]))
    return 0 if any("topk" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
