"""Grad-CAM on the Evaluate page, computed once per question, not once per click.

Every click on that page (a relabel, an exclude, a filter) reruns the whole script, and Grad-CAM ran
again each time: measured on efficientnet_lite0 at 224 px, 3.6 s on the first and ~1 s on every
later rerun on 2 cores, most of what a relabel or an exclude cost. Here it is cached by what decides
its answer (the run's best checkpoint, the image, the class explained), so a rerun reuses it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st


def shown_name(source: str) -> str:
    """A sample as a person knows it: 'cats/001.jpg' or 'digits[17]', never a server path."""
    parts = Path(source).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else source


@st.cache_data(show_spinner=False, max_entries=16)
def validation_images(run_path: str, mtime: float) -> list[dict[str, Any]]:
    """Every validation image of the run, in the order of its split: index in the data, name, class.
    The split only (no decoding, no forward pass): the data is read as the run trained on it."""
    from engine.config import TrainConfig
    from engine.core.paths import runs_root
    from engine.data.splits import split_all
    from engine.runs.store import open_run
    from ui.cache import val_dataset

    config = TrainConfig.from_dict(open_run(runs_root(), run_path).config())
    ds = val_dataset(config.data, run_path)
    _, val, _ = split_all(ds, config)
    return [{"index": int(i), "name": shown_name(ds.sources[i]), "label": ds.class_names[ds.labels[i]]}
            for i in val]


@st.cache_data(show_spinner=False, max_entries=16)
def upload_refusal(data: bytes, name: str) -> str | None:
    """Why an uploaded image cannot be explained (the engine's message), or None; checked when it is
    uploaded, decoded bounded and reduced as the engine decodes every upload (a tiny thumbnail target)."""
    from engine.core.errors import EngineError
    from engine.data.images import open_image

    try:
        open_image(data, name=name, target=32)
    except EngineError as exc:
        return str(exc)
    return None


@st.cache_data(show_spinner="Computing Grad-CAM...", max_entries=32)
def explained(run_path: str, mtime: float, data: str, index: int | None, upload: bytes | None,
              upload_name: str, class_index: int | None) -> dict[str, Any]:
    """Grad-CAM of one validation image (``index``) or an uploaded one, for ``class_index`` (None: the
    predicted class): the image as the model saw it, the overlay and what it says."""
    from engine.data.images import open_image
    from engine.data.transforms import input_target
    from engine.outputs.explain import grad_cam
    from engine.runs.calibration import run_temperature
    from engine.runs.store import RunDir
    from ui.cache import load_trained, val_image

    handle = load_trained(run_path, mtime)
    need = input_target(handle.spec)  # images are decoded reduced to what the model looks at
    image = (open_image(upload, name=upload_name, target=need) if upload is not None
             else val_image(data, index, need, work_dir=run_path))
    result = grad_cam(handle, image, class_index, run_temperature(RunDir(Path(run_path))))  # calibrated, as everywhere
    return {"input": image.resize(result.overlay.size), "overlay": result.overlay, "class_name": result.class_name,
            "probability": result.probability, "layer": result.target_layer}
