"""Exports that load again: safetensors + JSON, TorchScript and ONNX with a parity check.

Every export is checked against the PyTorch model on real inputs before it is offered; a model
that cannot be exported says why instead of producing a broken file.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.core.errors import EngineError
from engine.data.transforms import input_target
from engine.models.factory import ModelHandle, ModelSpec

if TYPE_CHECKING:
    from engine.runs.open_set import OpenSetRule

TOLERANCE = 1e-4  # max |exported - pytorch| on logits, float32


@dataclass
class ExportResult:
    format: str
    path: str
    max_abs_diff: float
    tolerance: float
    same_top1: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.same_top1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def preprocessing(spec: ModelSpec) -> dict[str, Any]:
    """Everything needed to rebuild the engine's eval transform from a raw image file, without torch:
    decode reduced to ``decode_target`` (shortest side; JPEG DCT scaling, then a whole-factor
    ``Image.reduce``), transparency over white, EXIF orientation applied, RGB; torchvision's Resize to
    ``resize_size`` with ``interpolation`` (center: the shortest side, squash: both sides), CenterCrop to
    ``input_size``; pixels / ``scale``; (x - mean) / std; NCHW float32. ``predict_onnx.py`` applies it."""
    _, height, width = spec.input_size
    crop_pct = spec.crop_pct or 0.875  # timm's default when a config has none
    return {"input_size": [int(v) for v in spec.input_size], "layout": "NCHW", "dtype": "float32",
            "channel_order": "RGB", "scale": 255.0, "mean": [float(v) for v in spec.mean],
            "std": [float(v) for v in spec.std], "interpolation": spec.interpolation, "crop_pct": float(crop_pct),
            "crop_mode": spec.crop_mode,
            "resize_size": [math.floor(height / crop_pct), math.floor(width / crop_pct)],
            "decode_target": input_target(spec), "alpha": "over white", "exif_orientation": "applied"}


def model_card(handle: ModelHandle, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a loader needs besides the tensors: architecture, classes, preprocessing, versions."""
    import timm
    import torchvision

    return {"spec": handle.spec.to_dict(), "class_names": handle.spec.class_names,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in handle.spec.data_config().items()},
            "preprocessing": preprocessing(handle.spec),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__},
            **(extra or {})}


def weights_bytes(handle: ModelHandle) -> bytes:
    """The model's tensors as one safetensors file."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in handle.module.state_dict().items()})


def weights_bundle(handle: ModelHandle, extra: dict[str, Any] | None = None) -> bytes:
    """A zip with ``model.safetensors`` + ``model.json``: ``create_model(arch, weights='model.safetensors')``
    loads it back with its classes (the JSON beside the weights is read)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.safetensors", weights_bytes(handle))
        zf.writestr("model.json", json.dumps(model_card(handle, extra), indent=2))
    return buf.getvalue()


def onnx_metadata(handle: ModelHandle, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The ONNX file's metadata_props: class names and preprocessing (JSON), the model's name."""
    return {"class_names": json.dumps(list(handle.spec.class_names)),
            "preprocessing": json.dumps(preprocessing(handle.spec)), "model": handle.spec.name,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()}}


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set (replace) metadata_props entries of an ONNX file in place."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _inputs(handle: ModelHandle, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *handle.spec.input_size, generator=g)


def _compare(fmt: str, path: Path, reference: torch.Tensor, got: np.ndarray) -> ExportResult:
    ref = reference.detach().float().numpy()
    return ExportResult(format=fmt, path=str(path), max_abs_diff=float(np.abs(ref - got).max()),
                        tolerance=TOLERANCE, same_top1=bool((ref.argmax(-1) == got.argmax(-1)).all()))


def check_exportable_here(handle: ModelHandle) -> None:
    """On a shared server the hosted caps bound an export as they bound training: an imported run at
    4096 px took 2.6 GB of the app's memory to export to ONNX. Locally nothing is capped."""
    from engine.core.hosting import hosted_limits
    from engine.models.sizing import check_hosted_caps

    limits = hosted_limits()
    if limits is not None:
        params = sum(p.numel() for p in handle.module.parameters())
        check_hosted_caps(handle.spec, params, limits)


def export_torchscript(handle: ModelHandle, path: str | Path) -> ExportResult:
    """Trace in eval mode, save, load back and compare on a fresh batch."""
    check_exportable_here(handle)
    path = Path(path)
    module = handle.module.eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, _inputs(handle, 2, 0), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise EngineError(f"{handle.spec.name} cannot be exported to TorchScript: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from exc
    x = _inputs(handle, 3, 1)
    with torch.inference_mode():
        return _compare("torchscript", path, module(x), loaded(x).numpy())


def _onnx_export(module: torch.nn.Module, example: tuple, path: Path, outputs: tuple[str, ...] = ("logits",)) -> None:
    names = {"input_names": ["images"], "output_names": list(outputs), "verbose": False}
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=({0: batch},), **names)
    except Exception:  # some models only export with a fixed batch
        torch.onnx.export(module, example, str(path), dynamo=True, **names)


def export_onnx(handle: ModelHandle, path: str | Path, extra: dict[str, Any] | None = None,
                open_set: OpenSetRule | None = None) -> ExportResult:
    """torch.onnx (dynamo exporter) with a dynamic batch and the class names + preprocessing in its
    metadata (``onnx_metadata``; ``extra`` adds entries); checked with onnxruntime. ``open_set``: a run's
    rule, computed inside the graph as a second output when the model allows it (onnx_open_set.py);
    the metadata says either way."""
    import onnxruntime as ort

    from engine.outputs.onnx_open_set import OUTPUT, open_set_metadata, open_set_module

    check_exportable_here(handle)
    path = Path(path)
    module = handle.module.eval()
    example = (_inputs(handle, 2, 0),)
    exported, outputs, how = module, ("logits",), None
    if open_set is not None:
        wrapped, how = open_set_module(handle, open_set, example[0])
        if wrapped is not None:
            exported, outputs = wrapped, ("logits", OUTPUT)
    meta = dict(extra or {})
    if open_set is not None or "temperature" in meta:  # a calibrated run's export says whether its rule travels
        meta["open_set"] = open_set_metadata(open_set, how)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            _onnx_export(exported, example, path, outputs)
        write_onnx_metadata(path, onnx_metadata(handle, meta))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(f"{handle.spec.name} cannot be exported to ONNX: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from exc
    fixed = session.get_inputs()[0].shape[0]
    x = _inputs(handle, fixed if isinstance(fixed, int) else 3, 1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        result = _compare("onnx", path, module(x), got[0])
        if len(outputs) == 2:  # the score as the engine computes it (predict --run), within the same tolerance
            from engine.training.feature_cache import head_inputs

            expected = open_set.scores(head_inputs(module, handle.spec.head, x)).numpy()
            result.max_abs_diff = max(result.max_abs_diff, float(np.abs(expected - got[1]).max()))
    return result


def export_to_bytes(handle: ModelHandle, fmt: str) -> tuple[bytes, ExportResult]:
    """Export into a temp file and return its bytes with the parity result (for downloads)."""
    suffix = {"torchscript": ".pt", "onnx": ".onnx"}[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / f"model{suffix}"
        result = (export_torchscript if fmt == "torchscript" else export_onnx)(handle, target)
        return target.read_bytes(), result
