"""``python -m engine export RUN --format onnx|torchscript|safetensors``: a run's best model as files.

onnx: RUN.onnx (class names + preprocessing in its metadata) and predict_onnx.py beside it;
``quantize="int8"`` (dynamic) or ``"int8-static"`` (calibrated on training images) adds
RUN.int8.onnx and the validation accuracy of both under onnxruntime.
torchscript: RUN.pt (traced). safetensors: RUN.safetensors + RUN.json (classes, preprocessing,
architecture; ``create_model(NAME, weights='RUN.safetensors')`` reads both). Every file is checked
against the PyTorch model before it is reported, and written by rename (never half a file).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import EngineError
from engine.core.files import atomic_write_bytes, check_output_file
from engine.runs.store import RunDir

if TYPE_CHECKING:
    from engine.models.factory import ModelHandle
    from engine.runs.open_set import OpenSetRule

FORMATS = ("script", "onnx", "torchscript", "safetensors")
QUANTIZE = ("int8", "int8-static")  # onnxruntime dynamic | static QDQ calibrated on training images
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


def output_path(run: RunDir, fmt: str, output: str | None) -> Path:
    """Where ``fmt`` goes (default: RUN_ID + suffix in the working folder), refused in one line when
    it cannot be written, before any work is done."""
    if output == "-":
        raise EngineError(f"--format {fmt} writes binary files; name one with -o (e.g. -o {run.run_id}{SUFFIX[fmt]}).")
    target = Path(output or f"{run.run_id}{SUFFIX[fmt]}")
    if target.is_dir():
        raise EngineError(f"-o {target} is a folder; name the file to write, e.g. {target / (run.run_id + SUFFIX[fmt])}.")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise EngineError(f"-o {target}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise EngineError(f"-o {target}: not allowed to write there.")
    check_output_file(target, run.path.parent)
    return target


def planned_files(target: Path, fmt: str, quantize: str | None = None) -> list[Path]:
    """Every file an export of ``fmt`` to ``target`` writes, in the order it writes them."""
    if fmt == "safetensors":
        return [target, target.with_suffix(".json")]
    files = [target, *([int8_path(target)] if fmt == "onnx" and quantize else [])]
    if fmt == "onnx":
        from engine.outputs.onnx_export import PREDICT_SCRIPT_NAME

        files.append(target.with_name(PREDICT_SCRIPT_NAME))
    return files


def check_files_apart(run: RunDir, fmt: str, files: list[Path]) -> None:
    """An export's files never overwrite each other (``-o model.json`` was overwritten by the JSON card,
    ``-o predict_onnx.py`` by the script) nor a run: refused before anything is written. Names are
    compared ignoring case too, as a case-insensitive disk (macOS, Windows) would."""
    seen: dict[str, Path] = {}
    for path in files:
        check_output_file(path, run.path.parent)
        key = os.path.realpath(path).casefold()
        if key in seen:
            suffix = SUFFIX[fmt]
            raise EngineError(f"-o {files[0]}: a {fmt} export also writes {path.name} beside it, the same file as "
                              f"{seen[key].name}; name the output so they differ, e.g. -o {run.run_id}{suffix}.")
        seen[key] = path


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically, readable as an ordinary file would be (the temp file is private)."""
    atomic_write_bytes(path, data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def int8_path(target: Path) -> Path:
    return target.with_name(f"{target.stem}.int8.onnx")


def run_extras(run: RunDir, handle: ModelHandle) -> tuple[dict[str, Any], OpenSetRule | None]:
    """What every export of a run carries besides the model: its id, its temperature when calibrated (its
    logits / T give the calibrated probabilities) and its open-set rule (ONNX computes it inside)."""
    from engine.runs.calibration import run_temperature
    from engine.runs.open_set import run_open_set

    extra: dict[str, Any] = {"run_id": run.run_id}
    temperature = run_temperature(run)
    if temperature is not None:
        extra["temperature"] = temperature
    rule = run_open_set(run, handle.spec.num_classes)
    if rule is not None:
        extra["unknown_threshold"] = rule.threshold
    return extra, rule


def reset_int8_threshold(path: Path, scores: Any, quantile: float) -> None:
    """The INT8 model's features are not the float32 model's: its rule's threshold is set again, the same
    quantile of its own scores on the validation images (measured: with the float32 threshold, dynamic
    INT8 called held-out digits unknown)."""
    import numpy as np
    import onnx

    from engine.outputs.export import write_onnx_metadata

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    rule = json.loads(meta.get("open_set", "{}"))
    if not rule.get("exported") or not len(scores):
        return
    rule.update(threshold=float(np.quantile(np.asarray(scores, dtype=np.float64), quantile)),
                threshold_set_on=f"the INT8 model's scores of {len(scores)} validation images")
    write_onnx_metadata(path, {"open_set": json.dumps(rule)})


def export_run(run: RunDir, fmt: str, output: str | None = None, quantize: str | None = None) -> dict[str, Any]:
    """Export the run's best model; returns what was written and the checks (JSON-ready)."""
    from engine.outputs.export import export_onnx, export_torchscript, model_card, weights_bytes
    from engine.runs.load import load_run_model

    if fmt not in SUFFIX:
        raise EngineError(f"unknown export format '{fmt}'; use one of: {', '.join(FORMATS)}.")
    if quantize and fmt != "onnx":
        raise EngineError(f"--quantize {quantize} applies to --format onnx only.")
    if quantize not in (None, *QUANTIZE):
        raise EngineError(f"unknown quantisation '{quantize}'; use {' or '.join(QUANTIZE)}.")
    target = output_path(run, fmt, output)
    check_files_apart(run, fmt, planned_files(target, fmt, quantize))
    handle = load_run_model(run.path)  # best weights; a damaged run or one without them is refused here
    extra, rule = run_extras(run, handle)
    report: dict[str, Any] = {"run_id": run.run_id, "format": fmt, "model": handle.spec.name,
                              "class_names": list(handle.spec.class_names)}
    if fmt == "safetensors":
        card = target.with_suffix(".json")
        _write(target, weights_bytes(handle))
        _write(card, json.dumps(model_card(handle, extra), indent=2).encode())
        return {**report, "files": [str(target), str(card)], "parity": None}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / f"model{SUFFIX[fmt]}"
        result = (export_onnx(handle, staged, extra, rule) if fmt == "onnx" else export_torchscript(handle, staged))
        result.path = str(target)
        report["parity"] = result.to_dict()
        files = [target]
        if fmt == "onnx" and quantize:
            from engine.outputs.onnx_export import calibration_images, onnx_validation_accuracy, quantize_int8

            quantized = Path(tmp) / "model.int8.onnx"
            method = quantize_int8(staged, quantized, calibration_images(run) if quantize == "int8-static" else None)
            scores = onnx_validation_accuracy(run, {"float32": staged, "int8": quantized})
            if rule is not None and "int8" in scores["unknown_scores"]:
                reset_int8_threshold(quantized, scores["unknown_scores"]["int8"], rule.quantile)
            acc = scores["accuracy"]
            report["int8"] = {"path": str(int8_path(target)), "method": method, "images": scores["images"],
                              "val_acc_float32": acc["float32"], "val_acc_int8": acc["int8"],
                              "val_acc_change": acc["int8"] - acc["float32"],
                              "top1_agreement": scores["agreement"]["int8"],
                              "bytes_float32": staged.stat().st_size, "bytes_int8": quantized.stat().st_size}
            os.replace(quantized, int8_path(target))
            files.append(int8_path(target))
        os.replace(staged, target)
    if fmt == "onnx":
        from engine.outputs.onnx_export import PREDICT_SCRIPT_NAME, predict_script

        script = target.with_name(PREDICT_SCRIPT_NAME)
        _write(script, predict_script().encode(), 0o755)
        files.append(script)
    return {**report, "files": [str(f) for f in files]}
