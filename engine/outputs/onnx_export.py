"""ONNX beyond the file itself: the torch-free ``predict_onnx.py`` that goes beside it, a download of
both, dynamic INT8 quantisation and the validation accuracy of exported models under onnxruntime.

The exported file carries its class names and preprocessing in its metadata (export.onnx_metadata);
``predict_onnx_script.py`` (shipped as ``predict_onnx.py``) reads them and reproduces the engine's eval
transform from a raw image file with pillow + numpy alone.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import EngineError
from engine.models.factory import ModelHandle
from engine.outputs.export import ExportResult, export_onnx, write_onnx_metadata
from engine.outputs.onnx_open_set import OUTPUT, bank_nodes
from engine.runs.store import RunDir

if TYPE_CHECKING:
    from engine.runs.open_set import OpenSetRule

PREDICT_SCRIPT = Path(__file__).with_name("predict_onnx_script.py")
PREDICT_SCRIPT_NAME = "predict_onnx.py"


def predict_script() -> str:
    """The text of ``predict_onnx.py`` (onnxruntime, numpy, pillow; never torch)."""
    return PREDICT_SCRIPT.read_text()


def onnx_package(handle: ModelHandle, extra: dict[str, Any] | None = None,
                 open_set: OpenSetRule | None = None) -> tuple[bytes, ExportResult]:
    """A zip of ``model.onnx`` (metadata included; a run's open-set rule inside, export_onnx) and
    ``predict_onnx.py``, with the parity result."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.onnx"
        result = export_onnx(handle, target, extra, open_set)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(target, "model.onnx")
            zf.writestr(PREDICT_SCRIPT_NAME, predict_script())
        return buf.getvalue(), result


def quantize_int8(source: Path, target: Path, calibration: list[np.ndarray] | None = None) -> str:
    """INT8 weights with onnxruntime; returns the method. Without ``calibration``: dynamic quantisation
    (``quantize_dynamic``: activations quantised at run time, no data needed). With it (a list of
    preprocessed (3, H, W) images): static QDQ quantisation, per-channel weights, activation ranges
    calibrated on those images, which keeps a CNN's accuracy far better (depthwise convolutions
    suffer most from dynamic quantisation). The metadata of ``source`` is kept."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # "consider pre-processing" on the root logger: advice, not a problem
    try:
        if calibration is None:  # the open-set rule's training features stay as fitted (onnx_open_set.py)
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             nodes_to_exclude=bank_nodes(str(source)))
            method = "int8 dynamic (onnxruntime quantize_dynamic)"
        else:
            _quantize_static(source, target, calibration)
            method = f"int8 static QDQ, per-channel, calibrated on {len(calibration)} training images"
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantiser raises anything on an unusual graph
        raise EngineError(f"INT8 quantisation failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        logging.disable(logging.NOTSET)
    meta = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    write_onnx_metadata(target, {**meta, "quantization": method})
    return method


def _quantize_static(source: Path, target: Path, calibration: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise EngineError("INT8 static quantisation needs calibration images; the run's training split has none.")
    name = _session(source).get_inputs()[0].name

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: x[None].astype(np.float32)} for x in calibration])

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "pre.onnx"
        try:  # shape inference + graph optimisation, as onnxruntime advises before quantising
            quant_pre_process(str(source), str(model))
        except Exception:  # noqa: BLE001 - optional: quantise the exported graph as it is
            model = source
        quantize_static(str(model), str(target), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        nodes_to_exclude=bank_nodes(str(model)))  # named after the pre-processing


def calibration_images(run: RunDir, count: int = 64) -> list[np.ndarray]:
    """Up to ``count`` images of the run's training split through the eval transform (spread over the
    split, so every class is likely present)."""
    ds, indices, transform = _split_data(run, "train")
    step = max(1, len(indices) // count)
    dataset = _dataset(ds, indices[::step][:count], transform)
    return [dataset[i][0].numpy() for i in range(len(dataset)) if i not in dataset.substituted]


def _split_data(run: RunDir, which: str):
    from engine.config import TrainConfig
    from engine.data.datasets import load_source
    from engine.data.splits import split_indices
    from engine.data.transforms import eval_transform
    from engine.runs.load import check_same_classes, load_run_model

    config = TrainConfig.from_dict(run.config())
    spec = load_run_model(run.path).spec
    ds = load_source(config.data, work_dir=str(run.path))
    check_same_classes(run, spec.class_names, ds.class_names,
                       "the exported models cannot be scored or calibrated on that data")
    train, val = split_indices(ds, config)
    return ds, (train if which == "train" else val), eval_transform(spec)


def _dataset(ds, indices, transform):
    from engine.data.datasets import TransformDataset

    return TransformDataset(ds, indices, transform)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings on stderr about the quantised graph
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(session, x: np.ndarray) -> list[np.ndarray]:
    """Every output of the model for ``x`` (a fixed-batch model is fed padded chunks)."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if not fixed:
        return session.run(None, {inp.name: x})
    out = []
    for i in range(0, len(x), fixed):
        chunk = x[i:i + fixed]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
        out.append([o[:len(chunk)] for o in session.run(None, {inp.name: padded})])
    return [np.concatenate(parts) for parts in zip(*out)]


def onnx_validation_accuracy(run: RunDir, models: dict[str, Path], batch: int = 32) -> dict[str, Any]:
    """Accuracy of each ONNX file on the run's own validation split, computed with onnxruntime on the
    engine's eval transform (images unreadable since training are left out). Also how often the
    models agree with the first one on top-1, and each image's open-set score under each model that
    computes one (``unknown_scores``: an INT8 model's threshold is set again on these)."""
    ds, indices, transform = _split_data(run, "val")
    dataset = _dataset(ds, indices, transform)
    sessions = {name: _session(path) for name, path in models.items()}
    preds: dict[str, list[np.ndarray]] = {name: [] for name in models}
    scores: dict[str, list[np.ndarray]] = {name: [] for name, session in sessions.items()
                                           if OUTPUT in [o.name for o in session.get_outputs()]}
    labels: list[int] = []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        x = np.stack([item[0].numpy() for item in items]).astype(np.float32)
        labels.extend(int(item[1]) for item in items)
        for name, session in sessions.items():
            got = _outputs(session, x)
            preds[name].append(got[0].argmax(-1))
            if name in scores:
                scores[name].append(got[[o.name for o in session.get_outputs()].index(OUTPUT)])
    keep = np.array([p not in dataset.substituted for p in range(len(indices))], dtype=bool)
    y = np.asarray(labels)[keep]
    top1 = {name: np.concatenate(p)[keep] if p else np.zeros(0, int) for name, p in preds.items()}
    first = next(iter(top1.values()))
    return {"images": int(keep.sum()),
            "unknown_scores": {name: np.concatenate(v)[keep] for name, v in scores.items() if v},
            "accuracy": {name: float((p == y).mean()) if len(y) else 0.0 for name, p in top1.items()},
            "agreement": {name: float((p == first).mean()) if len(y) else 0.0 for name, p in top1.items()}}
