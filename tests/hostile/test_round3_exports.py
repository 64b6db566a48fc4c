"""Round 3, exports: an export's files never overwrite each other or the run (``-o model.json`` for
safetensors was overwritten by the JSON card, ``-o predict_onnx.py`` for ONNX by the script), refused
before anything is written; and the exported ``predict_onnx.py`` is as careful as the engine about
what it reads (a FIFO named like an image blocked it forever; pixels are counted before decoding).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.runs.store import open_run
from tests.conftest import tiny_lfw_run
from tests.hostile._cli import engine

SCRIPT = Path(__file__).resolve().parents[2] / "engine" / "outputs" / "predict_onnx_script.py"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    return tiny_lfw_run(tmp_path_factory.mktemp("round3-export-runs"), run_id="20240101-000000-exp")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 4. outputs never collide
COLLIDING = {
    "safetensors-o-json": (["--format", "safetensors", "-o", "model.json"], "model.json"),
    "safetensors-o-JSON-case": (["--format", "safetensors", "-o", "model.JSON"], "model.json"),
    "onnx-o-predict-script": (["--format", "onnx", "-o", "predict_onnx.py"], "predict_onnx.py"),
    "onnx-o-predict-script-case": (["--format", "onnx", "-o", "PREDICT_ONNX.py"], "predict_onnx.py"),
    "onnx-int8-o-predict-script": (["--format", "onnx", "--quantize", "int8", "-o", "predict_onnx.py"],
                                   "predict_onnx.py"),
}


@pytest.mark.parametrize("case", list(COLLIDING), ids=list(COLLIDING))
def test_an_export_whose_files_would_overwrite_each_other_is_refused(good_run, tmp_path, case):
    args, name = COLLIDING[case]
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(good_run.path)
    ran = engine("export", str(good_run.path), *args, cwd=out)
    ran.assert_one_line_error(f"also writes {name}")
    assert list(out.iterdir()) == []  # nothing written, not even a temp file
    assert _snapshot(good_run.path) == before


def test_a_card_name_linked_into_the_run_is_refused_and_the_run_untouched(good_run, tmp_path):
    """-o x.safetensors writes x.json beside it: a link there into the run would replace the run's file."""
    runs = tmp_path / "runs"
    shutil.copytree(good_run.path, runs / good_run.run_id)
    run = open_run(runs, good_run.run_id)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").symlink_to(run.path / "best.json")
    before = _snapshot(run.path)
    ran = engine("export", run.run_id, "--out", str(runs), "--format", "safetensors", "-o", str(out / "x.safetensors"))
    ran.assert_one_line_error("is not a plain file")
    assert _snapshot(run.path) == before and not (out / "x.safetensors").exists()


def test_an_export_whose_files_are_apart_writes_both(good_run, tmp_path):
    """The control: a name that does not collide exports weights and card, both loadable."""
    from engine.models.factory import create_model

    ran = engine("export", str(good_run.path), "--format", "safetensors", "-o", "model.safetensors", "--json",
                 cwd=tmp_path)
    assert ran.rc == 0, ran.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert json.loads((tmp_path / "model.json").read_text())["class_names"]
    handle = create_model("timm:test_resnet", weights=str(tmp_path / "model.safetensors"))
    assert handle.spec.class_names == json.loads((tmp_path / "model.json").read_text())["class_names"]


# ------------------------------------------------------------------ 6. predict_onnx.py reads carefully
def _tiny_onnx(path: Path) -> None:
    """A 3-class ONNX model built by hand (global average pool of a 16 px image), with the metadata the
    exporter writes: what predict_onnx.py needs, without an export of a trained model."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    prep = {"input_size": [3, 16, 16], "layout": "NCHW", "dtype": "float32", "channel_order": "RGB", "scale": 255.0,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "resize_size": [16, 16], "decode_target": 16}
    for key, value in {"class_names": json.dumps(["red", "green", "blue"]), "preprocessing": json.dumps(prep)}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _huge_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (and one tiny IDAT): decoding it whole would be
    gigabytes, the header alone is 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) +
                     chunk(b"IEND", b""))


@pytest.fixture()
def script_dir(tmp_path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(SCRIPT, folder / "predict_onnx.py")
    _tiny_onnx(folder / "model.onnx")
    Image.fromarray(np.full((20, 24, 3), (250, 10, 10), np.uint8)).save(folder / "red.png")
    return folder


def _hostile_image(folder: Path, case: str) -> Path:
    target = folder / "photo.jpg"
    if case == "fifo":
        os.mkfifo(target)
    elif case == "link-to-fifo":
        os.mkfifo(folder / "pipe")
        target.symlink_to(folder / "pipe")
    elif case == "folder":
        target.mkdir()
    elif case == "device":
        target.symlink_to("/dev/zero")
    elif case == "huge-header":  # beyond Pillow's own bomb limit
        target = folder / "huge.png"
        _huge_png_header(target, 60_000, 60_000)
    elif case == "144-megapixel-header":  # under Pillow's limit, over the workbench's 50 MP
        target = folder / "big.png"
        _huge_png_header(target, 12_000, 12_000)
    elif case == "empty":
        target.write_bytes(b"")
    return target


HOSTILE_IMAGES = {"fifo": "not a regular file", "link-to-fifo": "not a regular file", "folder": "not a regular file",
                  "device": "not a regular file", "huge-header": "too large: 3,600,000,000 pixels (limit 50 MP)",
                  "144-megapixel-header": "too large: 12000x12000 pixels (limit 50 MP)", "empty": "empty file"}


@pytest.mark.parametrize("case", list(HOSTILE_IMAGES), ids=list(HOSTILE_IMAGES))
def test_predict_onnx_refuses_what_it_must_not_read_and_goes_on(script_dir, case):
    bad = _hostile_image(script_dir, case)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "predict_onnx.py", bad.name, "red.png", "--json"], cwd=script_dir,
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 60 and proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert HOSTILE_IMAGES[case] in results[0]["error"], results[0]
    assert results[1]["topk"][0]["label"] == "red"  # the good image beside it still predicts


def test_predict_onnx_refuses_a_fifo_as_the_model(script_dir):
    (script_dir / "model.onnx").unlink()
    os.mkfifo(script_dir / "model.onnx")
    proc = subprocess.run([sys.executable, "predict_onnx.py", "red.png"], cwd=script_dir, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_onnx_counts_pixels_before_decoding(script_dir, monkeypatch):
    """Called as a library: a 144-megapixel header (576 MB once allocated) is refused from the header;
    Pillow's load(), which allocates and decodes, is never reached."""
    spec = importlib.util.spec_from_file_location("predict_onnx_under_test", script_dir / "predict_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = _hostile_image(script_dir, "144-megapixel-header")
    loads: list[object] = []
    from PIL import ImageFile

    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original(self))
    with pytest.raises(ValueError, match=r"too large: 12000x12000 pixels \(limit 50 MP\)"):
        module.load_image(path, 16)
    assert loads == []
    assert module.load_image(script_dir / "red.png", 16).size == (24, 20) and loads  # the control: a real decode loads
