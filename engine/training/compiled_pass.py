"""A frozen pass over many images, compiled: what enters some modules of the model, computed by ONNX Runtime
(or a frozen TorchScript graph where ONNX Runtime cannot take the model) instead of eager PyTorch.

Why: feature extraction and the plans that train the top stages run the frozen part once over every
image, and on a CPU that pass is most of their time. efficientnet_lite0 at 224 px on two cores: eager
70 images/s, a TorchScript graph frozen for inference 100-110, ONNX Runtime (its CPU provider fuses
convolution, BatchNorm and activation and picks its own kernels) 190-200. The build costs about a
second (an export of the model with a batch of two), so a pass compiles only from COMPILE_FROM_PIXELS;
the exported graph is kept on disk for the next run of the same weights (about 0.2 s then).

Any cuts, not only the head's input: the exported module runs the model and returns what hooks saw
entering the cuts; everything after the deepest reaches no output and the exporter drops it, so the
graph stops there as the eager pass does. Every build is checked against the eager model on two batch sizes
before it is used; where it does not hold (a model that does not export or trace, not a CPU, any
difference) the pass stays eager.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.core.paths import machine_cache_dir

# images x pixels of one feature pass from which a compiled extractor pays for its build (about 1 s for
# efficientnet_lite0): ~160 images at 224 px
COMPILE_FROM_PIXELS = 8_000_000
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# images per call into ONNX Runtime: its CPU arena keeps what the largest call needed (efficientnet_lite0 at
# 224 px: +800 MB for 64 images, +230 MB for 16 at 193 images/s, +120 MB for 8 at 184)
SLICE = 8
# exported graphs kept on disk, the least recently used dropped past either bound (efficientnet_lite0's: 13 MB;
# a ViT-B's: 330 MB); the newest is always kept
KEEP_GRAPHS = 6
KEEP_BYTES = 1_000_000_000

Extractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # a batch -> what enters each of its points


@dataclass
class CompiledPasses:
    """A run's compiled extractors, each built once and shared by its passes (the automatic plan's sample,
    the training and validation passes): a graph of several points serves a pass of any of them.
    ``pixels``: of one image; ``run_images``: how many images the run's frozen passes see in all. A pass
    compiles from COMPILE_FROM_PIXELS images x pixels, counting the run's when a graph is shared."""

    pixels: int
    run_images: int = 0
    built: dict[tuple[str, ...], Extractor | None] = field(default_factory=dict)

    def worth(self, images: int) -> bool:
        return self.pixels * max(images, self.run_images) >= COMPILE_FROM_PIXELS

    def graph_for(self, points: Sequence[str]) -> Extractor | None:
        """A built graph that gives every one of ``points``."""
        return next((run for names, run in self.built.items() if run is not None and set(points) <= set(names)),
                    None)


class UpTo(nn.Module):
    """The model run only as far as what enters each of ``points``: the forward returns what the hooks saw,
    so for a tracer everything after the deepest cut is dead code."""

    def __init__(self, model: nn.Module, points: Sequence[str]):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.points = list(points)
        self._seen: dict[str, torch.Tensor] = {}
        for point in self.points:
            self.model.get_submodule(point).register_forward_pre_hook(
                lambda _m, inputs, point=point: self._seen.setdefault(point, inputs[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._seen.clear()
        self.model(x)
        return tuple(self._seen[point] for point in self.points)


def compiled_extractor(model: nn.Module, points: Sequence[str], example: torch.Tensor, eager: Extractor,
                       ) -> Extractor | None:
    """What enters each of ``points``, compiled for the CPU: ONNX Runtime, else a frozen TorchScript graph;
    None where neither holds. ``eager`` gives the reference for a batch (the checks run it on three
    images of ``example`` and on one)."""
    if example.device.type != "cpu" or not points or len(example) < 2:
        return None
    checks = (example[:3], example[:1])  # not the export's batch of two: the graph must take any batch
    try:
        trunk = UpTo(model, points)  # one copy of the model for either way
    except Exception:  # noqa: BLE001 - a point the model lacks, a model that does not copy: the eager pass
        return None
    with torch.no_grad():
        wants = [eager(batch) for batch in checks]
    for build in (_onnx_runtime, _torchscript):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporters' notes on timm's Python-side branches
                run = build(trunk, example)
                if all(_same(run(batch), want) for batch, want in zip(checks, wants)):
                    return run
        except Exception:  # noqa: BLE001 - a model that does not export keeps the next way, or the eager pass
            continue
    return None


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].shape == want[k].shape and torch.allclose(got[k].float(), want[k].float(), **TOLERANCE) for k in want)


def _onnx_runtime(trunk: UpTo, example: torch.Tensor) -> Extractor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(_exported(trunk, example)), options, providers=["CPUExecutionProvider"])

    points = list(trunk.points)  # not the trunk: the session has the weights, the model copy can go

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [session.run(None, {"x": batch[i:i + SLICE].float().contiguous().numpy()})
                 for i in range(0, len(batch), SLICE)]
        return {point: torch.from_numpy(np.concatenate([part[k] for part in parts])) for k, point in enumerate(points)}

    return run


def _exported(trunk: UpTo, example: torch.Tensor) -> Path:
    """The ONNX graph of ``trunk`` for images shaped as ``example``'s, exported once per model, weights,
    cut, shape and torch version, and kept in the machine's cache (``WORKBENCH_CACHE``): the export is
    most of the build (about 1 s for efficientnet_lite0), and runs train the same backbone again and
    again. What is read back is checked against the eager model before use, as a fresh export is."""
    folder = machine_cache_dir() / "graphs"
    path = folder / f"{_graph_key(trunk, example)}.onnx"
    if path.is_file():
        with contextlib.suppress(OSError):
            path.touch()  # recently used
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a cache that cannot be written: this run's own copy
        folder = Path(tempfile.mkdtemp(prefix="workbench-graph-"))
        path = folder / path.name
    partial = path.with_suffix(f".{os.getpid()}.part")
    try:
        # the TorchScript-based exporter: ~1 s where torch.export's takes 7-8 s for the same graph
        outputs = [f"y{i}" for i in range(len(trunk.points))]
        torch.onnx.export(trunk, (example[:2].contiguous(),), str(partial), dynamo=False, input_names=["x"],
                          output_names=outputs, dynamic_axes={name: {0: "n"} for name in ["x", *outputs]})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    _prune(folder)
    return path


def _prune(folder: Path) -> None:
    """The newest graphs within KEEP_GRAPHS and KEEP_BYTES; another process's pruning at the same time is
    no error."""
    sizes = []
    for graph in folder.glob("*.onnx"):
        try:
            info = graph.stat()
        except OSError:
            continue
        sizes.append((info.st_mtime, info.st_size, graph))
    total = 0
    for rank, (_mtime, size, graph) in enumerate(sorted(sizes, key=lambda row: row[0], reverse=True)):
        total += size
        if rank and (rank >= KEEP_GRAPHS or total > KEEP_BYTES):
            graph.unlink(missing_ok=True)


def _graph_key(trunk: UpTo, example: torch.Tensor) -> str:
    """What the exported graph depends on: the architecture as printed, the weights and buffers of every
    module that runs before the deepest cut (a new head's random weights after it change nothing), the
    cuts, the image shape and dtype, torch's version."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{torch.__version__}|{tuple(example.shape[1:])}|{example.dtype}|{trunk.points}|{trunk.model!r}"
                  .encode())
    for name, tensor in _state_before(trunk, example[:1]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _state_before(trunk: UpTo, image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers held directly by each module entered before the deepest cut, in a
    forward of ``image``."""
    entered: list[str] = []
    handles = [module.register_forward_pre_hook(lambda _m, _i, name=name: entered.append(name))
               for name, module in trunk.model.named_modules()]
    try:
        trunk(image)
    finally:
        for handle in handles:
            handle.remove()
    last = max((entered.index(point) for point in trunk.points if point in entered), default=len(entered))
    before = entered[:last]
    state = []
    for name in dict.fromkeys(before):
        module = trunk.model.get_submodule(name)
        state += [(f"{name}.{key}", value) for key, value in
                  [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
    return state


def _torchscript(trunk: UpTo, example: torch.Tensor) -> Extractor:
    graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(trunk, example, check_trace=False)
                                                               .eval()))
    points = list(trunk.points)
    return lambda batch: dict(zip(points, graph(batch)))
