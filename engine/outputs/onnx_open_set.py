"""The open-set rule inside an exported ONNX model (engine/runs/open_set.py): the file computes it, so
it travels with the model and needs nothing beside it.

The exported graph has two outputs: ``logits`` (exactly the model's) and ``unknown_score``, each image's
cosine distance to its k-th nearest training image in the features the head sees, the training
features (the bank) being a constant of the graph. The metadata entry ``open_set`` holds the rule, the
threshold and the output's name; ``predict_onnx.py`` flags an image unknown above the threshold, the
same way ``predict --run`` does.

One forward serves both outputs: the model with its head replaced by the identity gives the head's
input, and the head gives the logits from it. That holds when the head is the model's last step; a
model that applies layers after its head (SqueezeNet's pooling after its classifier convolution, for
example) is checked on random inputs, found different, and exported without the rule, the metadata
saying why.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from engine.models.factory import ModelHandle
from engine.runs.open_set import RULE, RULE_TEXT, OpenSetRule

OUTPUT = "unknown_score"
SPLIT_TOLERANCE = 1e-4  # max |head(trunk(x)) - model(x)| on random inputs for the split to stand


class OpenSetModel(nn.Module):
    """The model's logits and, from the same forward, the open-set score of each image."""

    def __init__(self, trunk: nn.Module, head: nn.Module, rule: OpenSetRule):
        super().__init__()
        self.trunk, self.head, self.k = trunk, head, int(min(rule.k, rule.bank.shape[0]))
        # (dims, bank images): the MatMul reads the constant directly, so INT8 can leave it out by name
        self.register_buffer("bank_t", rule.bank.float().T.contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(images)
        logits = self.head(features)
        unit = nn.functional.normalize(features.flatten(1), dim=1)
        nearest = torch.topk(unit @ self.bank_t, self.k, dim=1).values[:, -1]
        return logits, (1.0 - nearest).clamp(0.0, 2.0)


def open_set_module(handle: ModelHandle, rule: OpenSetRule, example: torch.Tensor) -> tuple[OpenSetModel | None, str]:
    """The wrapper to export, or None and why the rule cannot travel inside this model."""
    module = handle.module.eval()
    trunk = copy.deepcopy(module)
    parent_name, _, leaf = handle.spec.head.rpartition(".")
    parent = trunk.get_submodule(parent_name) if parent_name else trunk
    head = copy.deepcopy(module.get_submodule(handle.spec.head))
    setattr(parent, leaf, nn.Identity())
    wrapped = OpenSetModel(trunk.eval(), head.eval(), rule).eval()
    why = (f"not exported: {handle.spec.name} applies layers after its head, so the features the rule needs are "
           "not one step before the logits in this model; predict --run applies the rule")
    try:
        with torch.inference_mode():
            reference = module(example)
            logits, _score = wrapped(example)
            features = trunk(example)
    except RuntimeError:  # e.g. the head convolution given the pooled features: the split does not stand
        return None, why
    if features.flatten(1).shape[1] != rule.bank.shape[1] or logits.shape != reference.shape \
            or float((logits - reference).abs().max()) > SPLIT_TOLERANCE:
        return None, why
    return wrapped, "exported"


def open_set_metadata(rule: OpenSetRule | None, exported: str | None) -> dict[str, Any]:
    """The metadata entry ``open_set``: the rule, its threshold and output, or why it is absent."""
    if rule is None:
        return {"exported": False, "why": "the run has no open-set rule (python -m engine calibrate RUN fits one)"}
    if exported != "exported":
        return {"exported": False, "why": exported or "not exported"}
    return {"exported": True, "rule": RULE, "text": RULE_TEXT, "output": OUTPUT, "threshold": rule.threshold,
            "k": rule.k, "quantile": rule.quantile, "images": int(rule.bank.shape[0])}


def bank_nodes(model_path: str) -> list[str]:
    """The graph nodes that read the bank constant: INT8 quantisation leaves them in float32 (the rule's
    distances stay as they were fitted; the bank is data, not weights)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    names = {init.name for init in model.graph.initializer if "bank" in init.name}
    return [node.name for node in model.graph.node if names.intersection(node.input)]
