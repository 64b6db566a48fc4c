"""The named plans a race, a comparison and ``--strategy auto`` pick from: short names for FreezePlans on a
model's backbone, with the learning rates those experiments train them with.
"""
from __future__ import annotations

from engine.core.errors import EngineError
from engine.freeze.plan import FreezePlan

PLANS = ("fe", "last-1", "last-2", "full", "gradual")
LABELS = {"fe": "feature extraction", "last-1": "last 1 stage", "last-2": "last 2 stages",
          "full": "full fine-tune", "gradual": "gradual unfreezing"}


def named_plan(name: str, backbone_stages: int) -> FreezePlan:
    """The plan a race name stands for, on a model with ``backbone_stages`` stages (last-n and
    gradual unfreezing are clamped to it). LRs as the comparison uses them: 1e-2 for a lone head,
    2e-3 and one LR for every group when the backbone trains."""
    if name == "fe":
        return FreezePlan.feature_extraction(head_lr=1e-2)
    if name in ("last-1", "last-2"):
        return FreezePlan.last(min(int(name[-1]), backbone_stages), head_lr=2e-3, backbone_lr_ratio=1.0)
    if name == "full":
        return FreezePlan.default()
    if name == "gradual":  # epoch 1 the head, then the top stage, the top two, then everything
        steps = sorted({(1, min(1, backbone_stages)), (2, min(2, backbone_stages)), (3, backbone_stages)})
        return FreezePlan.feature_extraction(head_lr=2e-3, backbone_lr_ratio=1.0, unfreeze_schedule=tuple(steps))
    raise EngineError(f"Unknown plan '{name}': the named plans are {', '.join(PLANS)}.")
