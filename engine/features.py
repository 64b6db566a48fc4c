"""Backbone features: what the head sees (the input of the classifier), for any model.

A forward pre-hook on the head captures its input, so this works whatever the family calls its
head and however it pools; no architecture-specific ``forward_features`` is needed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn


class _Captured(Exception):
    """Raised from the hook to stop the forward once the head input is known."""


def head_inputs(module: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """Features entering ``head`` for batch ``x`` (the head itself is not run)."""
    box: dict[str, torch.Tensor] = {}

    def grab(_m: nn.Module, inputs: tuple) -> None:
        box["x"] = inputs[0]
        raise _Captured

    handle = module.get_submodule(head).register_forward_pre_hook(grab)
    try:
        module(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise RuntimeError(f"the head '{head}' was never called during forward")
    return box["x"].flatten(1)


def extract_features(
    module: nn.Module,
    head: str,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
) -> torch.Tensor:
    """Eval-mode features of PIL images, batched, with BN using its stored statistics."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
                chunks.append(head_inputs(module, head, batch).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)
