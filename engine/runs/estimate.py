"""How long a training or a sweep will take, said before it starts, from the speed of the runs this
machine already trained.

Why from past runs: speed depends on the model, the image size, what trains and the machine (and
what else it is doing); a run that trained the same model at the same size here is the only honest
source. With none, nothing is promised: the first epoch's time is shown as soon as it is known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.runs.store import list_runs


@dataclass(frozen=True)
class Speed:
    images_per_s: float
    run_id: str  # the run it was measured on

    def seconds(self, images: int) -> float:
        return images / max(self.images_per_s, 1e-9)

    def describe(self, images: int) -> str:
        return f"about {format_duration(self.seconds(images))} (at the speed of run {self.run_id})"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def measured_speed(runs_root: str | Path, model: str, image_size: int | None, strategy: str,
                   newest: int = 50) -> Speed | None:
    """The training speed of the newest run (of the ``newest`` runs) with this model, image size and
    kind of plan, as its last epoch measured it; None when no such run trained here."""
    for run in list_runs(runs_root)[:newest]:
        config = run.config_or_empty()
        plan = config.get("plan") if isinstance(config.get("plan"), dict) else {}
        if config.get("model") != model or config.get("image_size") != image_size or plan.get("strategy") != strategy:
            continue
        for row in reversed(run.metrics()):  # well-formed rows only (engine.runs.metrics_file), never raises
            speed = row["images_per_s"]
            if speed > 0:
                return Speed(float(speed), run.run_id)
    return None
