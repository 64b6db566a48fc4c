"""Which images are possibly mislabelled: a finished run's loss on every image it trained and
validated on, highest first.

Why the training split too: a wrong label in the training images is the one that does harm (the model
is taught it), and it is exactly where an evaluation never looks. A model rarely fits a wrong label
well in a few epochs, so such an image keeps a high loss: the model is confident in another class.
A high loss is a lead, not a verdict - the image may simply be hard - so the ranking shows the image,
its given label and the model's answer, and the person decides (engine.data.overrides).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from engine.config import TrainConfig
from engine.core.device import resolve_device
from engine.core.errors import EngineError
from engine.core.memory import inference_batch
from engine.data.overrides import image_key
from engine.data.splits import split_all
from engine.outputs.predict import class_probs
from engine.runs.calibration import run_temperature
from engine.runs.load import check_same_classes, load_run_model
from engine.runs.store import RunDir

SPLITS = ("train", "val")


@dataclass
class Suspect:
    """One image, as the ranking shows it."""

    image: str  # its name inside the dataset (what a decision names): 'cat/001.png' or 'digits[17]'
    source: str
    index: int  # into the run's data as it trained on it
    split: str  # train | val
    given: str  # the label it trained with
    predicted: str
    probability: float  # of the predicted class
    given_probability: float
    loss: float  # -log p(given)


@dataclass
class MislabeledReport:
    run_id: str
    checkpoint: str
    images: int  # how many were scored
    suspects: list[Suspect]  # highest loss first, at most ``top``
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MislabeledReport:
        return cls(run_id=data["run_id"], checkpoint=data["checkpoint"], images=data["images"],
                   suspects=[Suspect(**s) for s in data["suspects"]], unreadable=list(data.get("unreadable") or []))


def rank_mislabeled(run: RunDir, kind: str = "best", top: int = 20) -> MislabeledReport:
    """The ``top`` images of the run's train and val splits with the highest loss under its ``kind``
    checkpoint, read with the decisions the run trained with (its own split, its own labels)."""
    from engine.data.datasets import TransformDataset, load_source
    from engine.data.transforms import eval_transform

    if top < 1:
        raise EngineError("--top must be at least 1.")
    config = TrainConfig.from_dict(run.config())
    handle = load_run_model(run.path, kind)
    ds = load_source(config.data, work_dir=str(run.path))
    names = list(handle.spec.class_names)
    check_same_classes(run, names, ds.class_names, "its losses cannot be computed on that data")
    train, val, _ = split_all(ds, config)
    indices = train + val
    splits = ["train"] * len(train) + ["val"] * len(val)
    dataset = TransformDataset(ds, indices, eval_transform(handle.spec))
    device = resolve_device(config.device)
    module = handle.module.to(device)
    loader = DataLoader(dataset, batch_size=inference_batch(module, handle.spec.input_size))
    temperature = run_temperature(run) if kind == "best" else None  # calibrated, as every prediction of the run
    probs = torch.cat([class_probs(module, x.to(device), max_batch=loader.batch_size, temperature=temperature)[0].cpu()
                       for x, _ in loader])
    labels = torch.tensor([ds.labels[i] for i in indices])
    given = probs.gather(1, labels[:, None]).squeeze(1)
    loss = -given.clamp_min(1e-12).log()
    best = probs.max(-1)
    order = [p for p in torch.argsort(loss, descending=True).tolist() if p not in dataset.substituted]
    suspects = [Suspect(image=image_key(ds, indices[p]), source=ds.sources[indices[p]], index=indices[p],
                        split=splits[p], given=names[int(labels[p])], predicted=names[int(best.indices[p])],
                        probability=float(best.values[p]), given_probability=float(given[p]), loss=float(loss[p]))
                for p in order[:top]]
    return MislabeledReport(run_id=run.run_id, checkpoint=kind, images=len(indices) - len(dataset.substituted),
                            suspects=suspects,
                            unreadable=[{"file": f, "reason": r} for f, r in dataset.failed])
