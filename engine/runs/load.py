"""A run's trained model, loaded only from a healthy checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.core.errors import RunError, WeightsError
from engine.models.factory import ModelSpec, check_finite_outputs, model_from_spec
from engine.runs.checkpoint_file import load_weights
from engine.runs.store import RunDir

if TYPE_CHECKING:
    from engine.models.factory import ModelHandle


def load_run_model(run_dir: str | Path, kind: str = "best") -> ModelHandle:
    """The model a run saved (``best`` or ``last``), with its own classes and preprocessing."""

    run = RunDir(Path(run_dir))
    path = run.checkpoint(kind)
    if not path.is_file():
        imported = run.status().imported_from
        raise RunError(f"The run {run.run_id} has no '{kind}' checkpoint" + (
            " (imported as a bundle, which carries only its best weights)." if imported else " yet."))
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
    handle = model_from_spec(spec, weights)
    try:
        check_finite_outputs(handle, f"The run {run.run_id}'s '{kind}' checkpoint")
    except WeightsError as exc:
        raise RunError(str(exc)) from None
    return handle


def check_same_classes(run: RunDir, checkpoint_classes: list[str], data_classes: list[str], purpose: str) -> None:
    """A run's checkpoint and the data it is read with must name the same classes, in order (its data
    may have changed since: a class folder added or removed). ``purpose``: what cannot be done, e.g.
    "it cannot be evaluated on that data"."""
    if list(checkpoint_classes) == list(data_classes):
        return
    shown = ", ".join(checkpoint_classes[:5]) + (" ..." if len(checkpoint_classes) > 5 else "")
    raise RunError(f"Run {run.run_id}: its checkpoint predicts other classes ({shown}) than its data has "
                   f"({len(data_classes)} classes); {purpose}.")
