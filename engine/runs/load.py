"""A run's trained model, loaded only from a healthy checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.core.errors import RunError
from engine.models.factory import ModelSpec, model_from_spec
from engine.runs.checkpoint_file import load_weights
from engine.runs.store import RunDir

if TYPE_CHECKING:
    from engine.models.factory import ModelHandle


def load_run_model(run_dir: str | Path, kind: str = "best") -> ModelHandle:
    """The model a run saved (``best`` or ``last``), with its own classes and preprocessing."""

    run = RunDir(Path(run_dir))
    path = run.checkpoint(kind)
    if not path.is_file():
        raise RunError(f"The run {run.run_id} has no '{kind}' checkpoint yet.")
    problems = run.problems() if kind == "best" else []
    if problems:
        raise RunError(f"The run {run.run_id} is damaged: {'; '.join(problems)}.")
    meta = run.checkpoint_meta(kind)
    try:
        spec = ModelSpec.from_dict(meta["spec"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise RunError(f"The run {run.run_id}: its '{kind}' checkpoint has no readable model description.") from exc
    weights = load_weights(path)
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in weights.values()):
        raise RunError(f"The run {run.run_id}: its '{kind}' weights hold NaN or infinite values.")
    return model_from_spec(spec, weights)
