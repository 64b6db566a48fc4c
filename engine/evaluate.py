"""Evaluate a run's checkpoint on the validation split it was trained with."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from engine.infer import load_run_model
from engine.runs import RunDir
from engine.train import TrainConfig, resolve_device


def validation_predictions(run: RunDir, kind: str = "best") -> dict[str, Any]:
    """Labels, probabilities and sources of every validation image, in eval + inference mode."""
    from engine.data import TransformDataset, load_source, stratified_split
    from engine.infer import eval_transform
    from engine.train import _subsample

    config = TrainConfig.from_dict(run.config())
    handle = load_run_model(run.path, kind)
    ds = load_source(config.data, work_dir=str(run.path))
    keep = _subsample(ds, config.max_per_class, config.split_seed)
    _, va, _ = stratified_split([ds.labels[i] for i in keep], config.val_fraction, config.test_fraction,
                                config.split_seed)
    indices = [keep[i] for i in va]
    loader = DataLoader(TransformDataset(ds, indices, eval_transform(handle.spec)), batch_size=64)
    device = resolve_device(config.device)
    module = handle.module.to(device).eval()
    probs, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            probs.append(module(x.to(device)).float().softmax(-1).cpu())
            labels.append(y)
    return {"handle": handle, "probs": torch.cat(probs), "labels": torch.cat(labels),
            "sources": [ds.sources[i] for i in indices], "class_names": handle.spec.class_names}


def evaluate_run(run: RunDir, kind: str = "best") -> dict[str, Any]:
    preds = validation_predictions(run, kind)
    probs, labels = preds["probs"], preds["labels"]
    loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    correct = probs.argmax(-1) == labels
    per_class = {}
    for c, name in enumerate(preds["class_names"]):
        mask = labels == c
        per_class[name] = float(correct[mask].float().mean()) if mask.any() else float("nan")
    return {"run_id": run.run_id, "checkpoint": kind, "val_acc": float(correct.float().mean()),
            "val_loss": loss, "val_images": int(labels.numel()), "per_class_acc": per_class}
