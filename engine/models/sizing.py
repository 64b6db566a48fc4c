"""What a model costs before it exists: sized from metadata, never by building it for real.

Why: a 14 KB run bundle named a 6.7-billion-parameter model and carried one head tensor; the import
built the model (27 GB of float32) before comparing tensors, and the app's process was killed for
every user. Everything a file or upload names is sized here first: the parameter count from the
catalog (``catalog_params.json``, else a build on the ``meta`` device, which allocates nothing), the
tensor shapes from a meta build, the activations of one input from a forward pass on meta tensors.
A model that does not fit the memory budget, or a shared server's caps, is refused in one line.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.hosting import HostedLimits, hosted_limits
from engine.core.memory import MemoryBudget, detect_budget, format_size

if TYPE_CHECKING:
    from engine.models.factory import ModelSpec

BYTES_PER_PARAM = 4  # float32, as the engine builds every model
LOAD_COPIES = 2  # a load holds the model and the state dict read from the file at once
ACTIVATION_COPIES = 3  # as engine.core.memory.inference_batch: what else is alive beside a layer's in/out
UNMEASURED_ACTIVATION_FACTOR = 64  # a model meta tensors cannot run: its activations as input bytes x this


def meta_module(spec: ModelSpec) -> nn.Module | None:
    """The architecture of ``spec`` with its head, built on the meta device (no memory, no init), or
    None when the builder cannot run there (some torchvision builders)."""
    from engine.models.factory import create_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_model(spec.name, weights="none", num_classes=spec.num_classes, check_output=False).module
    except EngineError:
        raise
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta says so in its own way
        return None


def meta_state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the module's state_dict holds (read from meta tensors)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def peak_activation_bytes(module: nn.Module | None, input_size: tuple[int, int, int]) -> int:
    """The largest input + output of one leaf layer for one image of ``input_size``, from a forward pass
    on meta tensors (shapes only); a model that cannot run on meta is estimated from its input's size."""
    fallback = int(torch.Size(input_size).numel()) * 4 * UNMEASURED_ACTIVATION_FACTOR
    if module is None:
        return fallback
    largest = [0]

    def hook(_m: nn.Module, inputs: tuple, output: object) -> None:
        size = sum(t.numel() * t.element_size() for t in (*inputs, output) if isinstance(t, torch.Tensor))
        largest[0] = max(largest[0], size)

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            module.eval()(torch.zeros(1, *input_size, device="meta"))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: estimated instead
        return fallback
    finally:
        for h in handles:
            h.remove()
    return largest[0] or fallback


def param_count_of(spec: ModelSpec, module: nn.Module | None) -> int | None:
    """Parameters of ``spec``'s model: counted on its meta build, else the catalog's count."""
    if module is not None:
        return sum(p.numel() for p in module.parameters())
    from engine.models.catalog import param_count

    return param_count(spec.name)


def check_hosted_caps(spec: ModelSpec, params: int | None, limits: HostedLimits | None) -> None:
    """A shared server's caps (engine.core.hosting) on what a file names: model size and input size."""
    if limits is None:
        return
    why = "this app runs on a shared server (hosted mode), where"
    if params is not None and params > limits.params:
        raise EngineError(f"{spec.name} has {params / 1e6:.1f} M parameters; {why} models have at most "
                          f"{limits.params / 1e6:.0f} M.")
    size = max(int(v) for v in spec.input_size[1:])
    if size > limits.image_size:
        raise EngineError(f"its preprocessing says {size} px images; {why} images are at most "
                          f"{limits.image_size} px.")


def check_fits(spec: ModelSpec, budget: MemoryBudget | None = None) -> nn.Module | None:
    """Refuse a model a load could not hold: the hosted caps, then its parameters (loaded twice over)
    plus one image's activations at its input size, against the memory budget. The catalog's count is
    compared first, so a huge model is refused without even a meta build. Returns the meta module
    (None where the builder cannot run on meta) for the caller's shape checks."""
    from engine.models.catalog import param_count

    limits = hosted_limits()
    known = param_count(spec.name, compute_missing=False)
    budget = budget or detect_budget()
    check_hosted_caps(spec, known, limits)
    if known is not None:
        _check_budget(spec, known * BYTES_PER_PARAM * LOAD_COPIES, budget, "its parameters")
    module = meta_module(spec)
    params = param_count_of(spec, module)
    check_hosted_caps(spec, params, limits)
    weights = (params or 0) * BYTES_PER_PARAM * LOAD_COPIES
    activations = ACTIVATION_COPIES * peak_activation_bytes(module, tuple(spec.input_size))
    _check_budget(spec, weights + activations, budget, f"its parameters and one {spec.input_size[-1]} px image")
    return module


def _check_budget(spec: ModelSpec, need: int, budget: MemoryBudget, what: str) -> None:
    if need > budget.bytes:
        raise EngineError(f"{spec.name} needs about {format_size(need)} for {what}, more than the memory budget "
                          f"of {budget}; it is refused before anything is built.")
