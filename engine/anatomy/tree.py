"""The nn.Module lesson made visible: the tree, parameter counts, buffers and output shapes.

Every row is computed from the live module (``named_modules``, ``parameters``, ``buffers`` and
forward hooks), so what the explorer shows is exactly what torch sees.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.modes import evaluating, model_lock


@dataclass
class ModuleRow:
    name: str  # dotted path, "" for the root
    type: str
    depth: int
    children: int
    params: int  # all parameters below this module (recursive)
    trainable: int
    own_params: int  # parameters registered directly on this module
    buffers: int  # elements in buffers below this module (e.g. BatchNorm running stats)
    buffer_names: list[str]
    output_shape: list[int] | list[list[int]] | None  # None when forward never called it

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


@dataclass
class ModelSummary:
    input_shape: list[int]
    output_shape: list[int]
    total_params: int
    trainable_params: int
    total_buffers: int
    rows: list[ModuleRow] = field(default_factory=list)
    text: str = ""  # print(model)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["frozen_params"] = self.frozen_params
        data["modules"] = data.pop("rows")
        return data


def _shape_of(value: Any) -> list[int] | list[list[int]] | None:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        shapes = [_shape_of(v) for v in value if isinstance(v, torch.Tensor)]
        return shapes[0] if len(shapes) == 1 else (shapes or None)
    if isinstance(value, dict):
        shapes = [list(v.shape) for v in value.values() if isinstance(v, torch.Tensor)]
        return shapes or None
    return None


def count_params(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; shared parameters counted once."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def refused_input_size(size: int, exc: Exception) -> str:
    """Why a model will not run at ``size`` px, in one line (the model's own words, shortened)."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"image size {size} does not fit this model ({first}). "
            "Use the model's own input size or a multiple of its patch size.")


def summarize(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = (3, 224, 224),
    *,
    batch: int = 1,
    max_depth: int | None = None,
) -> ModelSummary:
    """Walk the module tree and, if ``input_size`` is given, run one forward to record shapes.

    The forward runs in eval mode under ``inference_mode`` so it never moves BatchNorm statistics;
    the model's train/eval flags are restored afterwards.
    """
    shapes: dict[str, Any] = {}
    out_shape: list[int] = []
    if input_size is not None:
        with model_lock(model):  # the hooks see only this forward, never another thread's
            hooks = []
            for name, module in model.named_modules():
                def hook(_m, _inp, out, _name=name):
                    shapes.setdefault(_name, _shape_of(out))
                hooks.append(module.register_forward_hook(hook))
            try:
                with evaluating(model), torch.inference_mode():
                    device = next((p.device for p in model.parameters()), torch.device("cpu"))
                    out = model(torch.zeros(batch, *input_size, device=device))
                out_shape = _shape_of(out) or []
            except Exception as exc:  # e.g. a ViT whose patch grid does not divide this size
                raise EngineError(refused_input_size(input_size[-1], exc)) from exc
            finally:
                for h in hooks:
                    h.remove()

    rows = []
    for name, module in model.named_modules():
        depth = 0 if name == "" else name.count(".") + 1
        if max_depth is not None and depth > max_depth:
            continue
        total, trainable = count_params(module)
        buffers = list(module.named_buffers())
        rows.append(
            ModuleRow(
                name=name,
                type=type(module).__name__,
                depth=depth,
                children=len(list(module.children())),
                params=total,
                trainable=trainable,
                own_params=sum(p.numel() for p in module.parameters(recurse=False)),
                buffers=sum(b.numel() for _, b in buffers),
                buffer_names=[n for n, _ in module.named_buffers(recurse=False)],
                output_shape=shapes.get(name),
            )
        )
    total, trainable = count_params(model)
    return ModelSummary(
        input_shape=[batch, *input_size] if input_size else [],
        output_shape=list(out_shape),
        total_params=total,
        trainable_params=trainable,
        total_buffers=sum(b.numel() for b in model.buffers()),
        rows=rows,
        text=str(model),
    )


def module_tree(model: nn.Module, max_depth: int | None = None) -> dict[str, Any]:
    """Nested {name, type, params, children: [...]} for tree widgets."""

    def node(name: str, module: nn.Module, depth: int) -> dict[str, Any]:
        total, trainable = count_params(module)
        kids = []
        if max_depth is None or depth < max_depth:
            kids = [
                node(f"{name}.{child}" if name else child, sub, depth + 1)
                for child, sub in module.named_children()
            ]
        own = sum(p.numel() for p in module.parameters(recurse=False))
        return {"name": name, "type": type(module).__name__, "params": total,
                "own_params": own, "trainable": trainable, "children": kids}

    return node("", model, 0)
