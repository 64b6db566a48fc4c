"""``python -m engine export --format onnx|torchscript|safetensors``: files that predict like the engine.

The ONNX file carries its classes and preprocessing; ``predict_onnx.py`` (onnxruntime, numpy, pillow)
is run as a user would, in a fresh Python where ``import torch`` fails, on real photos of varied
formats, sizes and aspect ratios, and must give the engine's ``predict_files`` top-1 with probabilities
within 1e-3: for a tiny run trained here and for the packaged efficientnet_lite0 at 224 px.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.outputs.onnx_export import PREDICT_SCRIPT
from tests.conftest import tiny_lfw_run

PARITY = 1e-3  # max |probability difference| between predict_onnx.py and the engine
ALLOWED_IMPORTS = {"__future__", "argparse", "json", "sys", "pathlib", "numpy", "onnxruntime", "PIL"}


# ------------------------------------------------------------------ a real run and real photos
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (tiny model, LFW faces, 32 px)."""
    return tiny_lfw_run(tmp_path_factory.mktemp("export-runs"), run_id="tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cat_photo, coffee_photo) -> list[Path]:
    """Real photos as a user has them: PNGs from scikit-image, a non-square JPEG, a JPEG stored
    sideways with an EXIF orientation, a PNG with alpha, LFW faces and a digit as small grey files."""
    from engine.data.datasets import load_digits_set, load_lfw_set

    folder = tmp_path_factory.mktemp("photos")
    cat, coffee = Image.open(cat_photo).convert("RGB"), Image.open(coffee_photo).convert("RGB")
    out = [cat_photo, coffee_photo]
    cat.save(folder / "cat-451x300.jpg", quality=90)
    out.append(folder / "cat-451x300.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees
    coffee.resize((317, 211)).transpose(Image.Transpose.ROTATE_90).save(folder / "coffee-exif6.jpg", exif=exif)
    out.append(folder / "coffee-exif6.jpg")
    rgba = coffee.resize((123, 77)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 123, dtype=np.uint8), (77, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "coffee-alpha-123x77.png")
    out.append(folder / "coffee-alpha-123x77.png")
    cat.crop((100, 20, 190, 290)).save(folder / "cat-tall-90x270.jpg", quality=85)
    out.append(folder / "cat-tall-90x270.jpg")
    lfw = load_lfw_set()
    for i in (3, 150):
        face = lfw.image(i).convert("L")
        face.save(folder / f"lfw-{i}.png")
        face.resize((61, 40), Image.Resampling.BICUBIC).save(folder / f"lfw-{i}-61x40.jpg", quality=92)
        out += [folder / f"lfw-{i}.png", folder / f"lfw-{i}-61x40.jpg"]
    load_digits_set().image(7).convert("L").save(folder / "digit-8x8.png")
    out.append(folder / "digit-8x8.png")
    return out


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict[str, str]:
    """An environment whose Python cannot import torch: a ``torch`` package first on the path that
    refuses to load."""
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def predict_onnx(script: Path, model: Path, images: list[Path], env: dict[str, str], top_k: int = 5) -> list[dict]:
    proc = subprocess.run([sys.executable, str(script), "--model", str(model), "--top-k", str(top_k), "--json",
                           *map(str, images)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=script.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def parity(engine_preds, onnx_preds) -> float:
    """Max |probability difference| over every class of every image; top-1 must be the same."""
    worst = 0.0
    assert len(engine_preds) == len(onnx_preds)
    for e, o in zip(engine_preds, onnx_preds):
        assert e.error is None and "error" not in o, (e, o)
        assert o["topk"][0]["label"] == e.topk[0].label, (e.file, e.topk[:2], o["topk"][:2])
        mine = {t["index"]: t["prob"] for t in o["topk"]}
        for t in e.topk:
            worst = max(worst, abs(t.prob - mine[t.index]))
    return worst


# ------------------------------------------------------------------ the script itself
def test_predict_script_needs_no_torch_and_is_lint_clean(repo_root):
    tree = ast.parse(PREDICT_SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--config", str(repo_root / "ruff.toml"),
                           str(PREDICT_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ ONNX: metadata and parity on photos
def test_onnx_export_of_a_run_predicts_like_the_engine(trained, photos, no_torch, tmp_path, capsys):
    import onnx

    from engine.data.transforms import input_target
    from engine.outputs.predict import predict_files
    from engine.runs.load import load_run_model

    target = tmp_path / "out" / "tiny.onnx"
    target.parent.mkdir()
    assert main(["export", "tiny", "--out", str(trained.path.parent), "--format", "onnx", "-o", str(target),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    script = target.with_name("predict_onnx.py")
    assert report["files"] == [str(target), str(script)] and report["parity"]["ok"]
    assert os.access(script, os.X_OK)

    handle = load_run_model(trained.path)
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(meta["class_names"]) == ["non-face", "face"]
    prep = json.loads(meta["preprocessing"])
    spec = handle.spec
    assert prep["input_size"] == [3, 32, 32] and prep["crop_pct"] == pytest.approx(spec.crop_pct)
    assert prep["resize_size"] == [int(32 / spec.crop_pct)] * 2 and prep["interpolation"] == spec.interpolation
    assert prep["mean"] == pytest.approx(list(spec.mean)) and prep["std"] == pytest.approx(list(spec.std))
    assert prep["channel_order"] == "RGB" and prep["layout"] == "NCHW" and prep["scale"] == 255
    assert prep["decode_target"] == input_target(spec) and meta["run_id"] == "tiny"

    got = predict_onnx(script, target, photos, no_torch, top_k=2)
    # the run is calibrated: both divide its logits by its temperature (the metadata carries it)
    from engine.runs.calibration import run_temperature

    assert float(meta["temperature"]) == run_temperature(trained)
    worst = parity(predict_files(handle, photos, top_k=2, temperature=run_temperature(trained)), got)
    print(f"\ntiny run: max |prob diff| {worst:.2e} over {len(photos)} photos")
    assert worst < PARITY

    # the script's own default: the only .onnx beside it; an unreadable file is reported, not fatal
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[2].read_bytes()[:200])
    proc = subprocess.run([sys.executable, str(script), str(photos[0]), str(broken)], capture_output=True,
                          text=True, timeout=120, env=no_torch, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{photos[0]}: ") and "broken.jpg: error: " in proc.stderr


def test_packaged_efficientnet_lite0_at_224_predicts_like_the_engine(default_handle, photos, no_torch, tmp_path):
    from engine.outputs.export import export_onnx
    from engine.outputs.predict import predict_files

    assert default_handle.spec.input_size == (3, 224, 224) and default_handle.spec.interpolation == "bicubic"
    model = tmp_path / "lite0.onnx"
    result = export_onnx(default_handle, model)
    assert result.ok, result
    script = tmp_path / "predict_onnx.py"
    shutil.copy(PREDICT_SCRIPT, script)
    got = predict_onnx(script, model, photos, no_torch, top_k=5)
    worst = parity(predict_files(default_handle, photos, top_k=5), got)
    print(f"\nefficientnet_lite0 224: max |prob diff| {worst:.2e} over {len(photos)} photos")
    assert worst < PARITY
    assert got[0]["topk"][0]["index"] in range(281, 286)  # chelsea is a cat (ImageNet 281-285)


# ------------------------------------------------------------------ INT8, TorchScript, safetensors
def test_int8_export_reports_the_validation_accuracy_change(trained, photos, no_torch, tmp_path, capsys):
    import onnx

    from engine.outputs.evaluate import evaluate_run

    target = tmp_path / "tiny.onnx"
    assert main(["export", "tiny", "--out", str(trained.path.parent), "--format", "onnx", "-o", str(target),
                 "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    int8 = tmp_path / "tiny.int8.onnx"
    assert out.split() == [str(target), str(int8), str(tmp_path / "predict_onnx.py")]
    assert "validation accuracy" in err and "points" in err and "WARNING" not in err, err
    assert int8.stat().st_size < target.stat().st_size / 2
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(meta["class_names"]) == ["non-face", "face"] and "int8" in meta["quantization"]

    assert main(["export", "tiny", "--out", str(trained.path.parent), "--format", "onnx", "-o", str(target),
                 "--quantize", "int8", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["int8"]
    engine_eval = evaluate_run(trained)
    assert q["images"] == engine_eval.val_images
    assert q["val_acc_float32"] == pytest.approx(engine_eval.val_acc)  # onnxruntime float == PyTorch
    assert q["val_acc_change"] == pytest.approx(q["val_acc_int8"] - q["val_acc_float32"])
    assert 0.0 <= q["top1_agreement"] <= 1.0
    assert "dynamic" in q["method"]
    got = predict_onnx(tmp_path / "predict_onnx.py", int8, photos[:3], no_torch, top_k=2)
    assert all(len(r["topk"]) == 2 for r in got)

    # static: per-channel QDQ, activation ranges calibrated on the run's training images
    assert main(["export", "tiny", "--out", str(trained.path.parent), "--format", "onnx", "-o", str(target),
                 "--quantize", "int8-static", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["int8"]
    assert "static" in q["method"] and "calibrated on" in q["method"]
    assert q["val_acc_float32"] == pytest.approx(engine_eval.val_acc) and 0.0 <= q["val_acc_int8"] <= 1.0
    assert q["bytes_int8"] < q["bytes_float32"] / 2
    got = predict_onnx(tmp_path / "predict_onnx.py", int8, photos[:3], no_torch, top_k=2)
    assert all(len(r["topk"]) == 2 for r in got)


def test_torchscript_and_safetensors_exports_load_again(trained, photos, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from engine.models.factory import ModelSpec, create_model, model_from_spec
    from engine.outputs.predict import predict_files
    from engine.runs.load import load_run_model

    handle = load_run_model(trained.path)
    x = torch.randn(3, *handle.spec.input_size)
    with torch.inference_mode():
        reference = handle.module.eval()(x)

    ts = tmp_path / "tiny.pt"
    assert main(["export", "tiny", "--out", str(trained.path.parent), "--format", "torchscript", "-o", str(ts)]) == 0
    assert capsys.readouterr().out.split() == [str(ts)]
    with torch.inference_mode():
        assert torch.allclose(torch.jit.load(str(ts))(x), reference, atol=1e-5)

    monkeypatch.chdir(tmp_path)  # the default name: RUN_ID.safetensors in the working folder
    assert main(["export", str(trained.path), "--format", "safetensors", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    weights, card = Path("tiny.safetensors"), Path("tiny.json")
    assert report["files"] == [str(weights), str(card)]
    sidecar = json.loads(card.read_text())
    assert sidecar["class_names"] == ["non-face", "face"] and sidecar["preprocessing"]["input_size"] == [3, 32, 32]
    # the sidecar rebuilds the run's exact model: architecture, classes and its own preprocessing
    spec = ModelSpec.from_dict(sidecar["spec"])
    assert spec == handle.spec
    reloaded = model_from_spec(spec, load_file(tmp_path / weights))
    with torch.inference_mode():
        assert torch.allclose(reloaded.module.eval()(x), reference)
    assert [p.topk for p in predict_files(reloaded, photos[:3])] == [p.topk for p in predict_files(handle, photos[:3])]
    # and create_model reads its class names from the JSON beside the weights
    assert create_model(spec.name, weights=tmp_path / weights).spec.class_names == ["non-face", "face"]


# ------------------------------------------------------------------ refusals: one line, exit 2
def _one_line_error(capsys, argv: list[str], phrase: str) -> None:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's refusal
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert phrase.lower() in err.lower(), (phrase, err)


def test_export_refusals_are_one_line(trained, tmp_path, capsys):
    from engine.config import TrainConfig
    from engine.runs.store import create_run

    root = str(trained.path.parent)
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--format", "pdf"], "invalid choice")
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--format", "onnx", "-o", str(tmp_path)], "is a folder")
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--format", "onnx", "-o",
                             str(tmp_path / "missing" / "m.onnx")], "does not exist")
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--format", "onnx", "-o", "-"], "name one with -o")
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--format", "torchscript", "--quantize", "int8",
                             "-o", str(tmp_path / "m.pt")], "onnx only")
    _one_line_error(capsys, ["export", "tiny", "--out", root, "--quantize", "int8"], "onnx only")
    assert not list(tmp_path.iterdir())  # nothing was written by a refusal

    runs = tmp_path / "runs"
    config = TrainConfig(model="timm:test_resnet", weights="none", data="lfw", image_size=32, num_workers=0)
    create_run(runs, config.to_dict(), run_id="fresh")
    _one_line_error(capsys, ["export", "fresh", "--out", str(runs), "--format", "onnx", "-o",
                             str(tmp_path / "f.onnx")], "no 'best' checkpoint")
    shutil.copytree(trained.path, runs / "damaged")
    best = runs / "damaged" / "best.safetensors"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    _one_line_error(capsys, ["export", "damaged", "--out", str(runs), "--format", "safetensors", "-o",
                             str(tmp_path / "d.safetensors")], "damaged")
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "d.safetensors").exists()


def test_runs_page_download_is_the_model_with_its_metadata_and_the_script(trained, tmp_path):
    """What the Runs page offers for ONNX: one zip of model.onnx (metadata included) + predict_onnx.py."""
    import io
    import zipfile

    import onnx

    from engine.outputs.onnx_export import onnx_package
    from engine.runs.load import load_run_model

    data, result = onnx_package(load_run_model(trained.path), {"run_id": "tiny"})
    assert result.ok
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["model.onnx", "predict_onnx.py"]
        assert zf.read("predict_onnx.py").decode() == PREDICT_SCRIPT.read_text()
        meta = {p.key: p.value for p in onnx.load_from_string(zf.read("model.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == ["non-face", "face"] and "preprocessing" in meta
