"""The plans a race picks from and the budget it is given (engine/lab/race.py races them): their names
and labels, the rungs of successive halving, and the refusals that need no probe of the set-up.

A plan's name stands for a FreezePlan on the model's backbone (engine/freeze/presets.py): feature extraction, the
last one or two stages, a full fine-tune, gradual unfreezing. ``budget_value`` refuses a budget that is
no usable number of seconds before anything is probed; whether it fits the set-up and the first slices
is ``check_budget``'s question (engine/lab/race_estimate.py).
"""
from __future__ import annotations

import math
from typing import Any

from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits
from engine.freeze.presets import PLANS

ETA = 2  # each rung keeps 1/ETA of the plans (rounded up)
MIN_SLICE_S = 0.5  # the least a first-rung slice may be: below it a race ranks plans on noise
MAX_BUDGET_S = 24 * 3600.0


def parse_plans(text: str | None) -> tuple[str, ...]:
    """'fe,last-1,full' -> ('fe', 'last-1', 'full'); at least two distinct known plans. None: all of
    them; an empty text is a mistake, not "all"."""
    names = tuple(p.strip().lower() for p in (",".join(PLANS) if text is None else text).split(",") if p.strip())
    if not names:
        raise EngineError(f"No plans given: name at least two of {', '.join(PLANS)} (or leave --plans out for all).")
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise EngineError(f"Unknown plan(s) {', '.join(unknown)}: a race picks from {', '.join(PLANS)}.")
    if len(set(names)) != len(names):
        raise EngineError("Each plan may run once in a race (a plan is named twice).")
    if len(names) < 2:
        raise EngineError("A race needs at least two plans (with one there is nothing to race; use train).")
    return names


def budget_value(budget_s: Any) -> float:
    """The budget as seconds, refused when it is not a finite number, not positive, over 24 hours, or
    over a shared server's cap: what is checked before any probe of the set-up."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s):
        raise EngineError(f"The race budget must be a finite number of seconds (got {budget_s!r}).")
    if budget_s <= 0:
        raise EngineError(f"The race budget must be more than 0 seconds (got {budget_s:g}).")
    if budget_s > MAX_BUDGET_S:
        raise EngineError(f"The race budget is at most {MAX_BUDGET_S:.0f} s (24 hours; got {budget_s:g}).")
    limits = hosted_limits()
    if limits is not None and budget_s > limits.race_s:
        raise EngineError(f"This app runs on a shared server (hosted mode), where a race's budget is at most "
                          f"{limits.race_s} s ({limits.race_s // 60} minutes; got {budget_s:g}): the race holds the "
                          "device for all of it, and every training queued behind it waits.")
    return float(budget_s)


def rung_sizes(plans: int, eta: int = ETA) -> list[int]:
    """Plans alive in each rung: 5 -> [5, 3, 2, 1]; one plan races alone: [1]."""
    sizes = [plans]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / eta))
    return sizes


def backbone_stages(model: str) -> int:
    """How many stages the backbone of ``model`` has (its head not counted): what ``named_plan`` clamps to."""
    from engine.anatomy.stages import model_stages
    from engine.models.factory import create_model

    handle = create_model(model, weights="none")
    return sum(1 for s in model_stages(handle.module, handle.spec.head) if not s.is_head)
