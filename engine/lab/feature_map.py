"""The feature space a head sees, drawn: embed images, project to 2-D, and score how well it separates.

Why: the data-amount x task-similarity matrix says "a similar task already separates its classes,
so feature extraction suffices". This makes that visible and measurable: the features entering the
classifier (the same capture the feature cache uses, ``head_inputs``) for validation images, a 2-D
projection per class (PCA by default; UMAP when ``umap-learn`` is installed and asked for), and a
separability score: the leave-one-out k-nearest-neighbour accuracy in the full feature space (cosine
distance). A pretrained backbone that scores high here needs little more than a new head.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from engine.core.errors import DataError, EngineError
from engine.data.splits import evenly_by_class
from engine.training.feature_cache import embed

if TYPE_CHECKING:
    from engine.data.datasets import ImageSet
    from engine.models.factory import ModelHandle

METHODS = ("pca", "umap")


@dataclass
class FeatureMap:
    """One model's map of one set of images."""

    model: str  # what embedded them: "pretrained timm:..." or "run <id>"
    method: str
    points: list[list[float]]  # 2-D, one per image
    labels: list[int]
    class_names: list[str]
    sources: list[str]
    knn_acc: float  # leave-one-out k-NN accuracy in feature space: how separable the classes are
    k: int
    dims: int  # feature size before the projection
    explained: list[float] = field(default_factory=list)  # PCA: variance share of the two axes
    indices: list[int] = field(default_factory=list)  # each point's index in the dataset (for its image)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_k(labels: Sequence[int], k: int) -> int:
    """The k a leave-one-out vote can use: below the smallest class's image count. An image of a class
    of m images has at most m - 1 neighbours of its own class; with k beyond that, a perfectly separated
    class is outvoted (5-NN scored 0.00 on two classes of two images each, 1-NN 1.00)."""
    smallest = min(Counter(labels).values(), default=1)
    return max(1, min(k, smallest - 1))


def knn_accuracy(features: torch.Tensor, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out k-NN accuracy with cosine distance (ties: the nearer neighbours' class wins).
    ``k`` as given: see ``usable_k`` for the k the data allows."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    k = max(1, min(k, n - 1))
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))  # never its own neighbour
    nearest = similarity.topk(k, dim=1).indices
    y = torch.as_tensor(list(labels))
    hits = 0
    for i in range(n):
        votes = Counter()
        for rank, j in enumerate(nearest[i].tolist()):
            votes[int(y[j])] += 1 + (k - rank) * 1e-6  # a tie goes to the nearer neighbours
        hits += votes.most_common(1)[0][0] == int(y[i])
    return hits / n


def project(features: torch.Tensor, method: str = "pca", seed: int = 0) -> tuple[list[list[float]], list[float]]:
    """2-D coordinates (and, for PCA, the variance share of each axis)."""
    if method not in METHODS:
        raise EngineError(f"Unknown projection '{method}': use {' or '.join(METHODS)}.")
    x = features.double()
    if method == "umap":
        try:
            import umap  # optional: umap-learn
        except ImportError as exc:
            raise EngineError("UMAP needs the umap-learn package (pip install umap-learn); PCA works without it.") from exc
        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x.numpy())
        return [[float(a), float(b)] for a, b in coords], []
    centred = x - x.mean(0, keepdim=True)
    _u, s, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].T
    total = float((s ** 2).sum()) or 1.0
    signs = torch.sign(coords[coords.abs().argmax(0), torch.arange(coords.shape[1])])  # a stable orientation
    coords = coords * torch.where(signs == 0, 1.0, signs)
    explained = [float(s[i] ** 2 / total) for i in range(min(2, len(s)))]
    if coords.shape[1] < 2:  # one feature: a line
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
    return coords.tolist(), explained


def feature_map(handle: ModelHandle, ds: ImageSet, indices: Sequence[int], *, name: str, method: str = "pca",
                k: int = 5, seed: int = 0) -> FeatureMap:
    """Embed ``ds[indices]`` with ``handle``, project and score (with the k the data allows:
    ``usable_k``; the map records the k it used)."""
    labels = [ds.labels[i] for i in indices]
    if not indices:
        raise DataError(f"No validation images to map in {ds.name}: its validation share is empty (too few "
                        "images per class, or all of them skipped); use more images per class.")
    if len(set(labels)) < 2:
        raise DataError(f"The images to map from {ds.name} are of one class only: separability needs at least "
                        "two classes.")
    features = embed(handle, ds, indices)
    points, explained = project(features, method, seed)
    k = usable_k(labels, k)
    return FeatureMap(model=name, method=method, points=points, labels=labels, class_names=list(ds.class_names),
                      sources=[ds.sources[i] for i in indices], knn_acc=knn_accuracy(features, labels, k), k=k,
                      dims=int(features.shape[1]), explained=explained, indices=[int(i) for i in indices])


def run_maps(run_dir: str, *, method: str = "pca", k: int = 5, max_images: int = 1000) -> list[FeatureMap]:
    """"Pretrained" beside "after fine-tune" for a run, on its own validation images (at most
    ``max_images``, the same ones for both)."""
    from engine.config import TrainConfig
    from engine.data.datasets import load_source
    from engine.data.splits import split_indices
    from engine.models.factory import create_model
    from engine.runs.load import check_same_classes, load_run_model
    from engine.runs.store import RunDir

    run = RunDir(Path(run_dir))
    config = TrainConfig.from_dict(run.config())
    tuned = load_run_model(run.path)
    ds = load_source(config.data, work_dir=str(run.path))
    check_same_classes(run, tuned.spec.class_names, ds.class_names, "its feature space cannot be mapped on that data")
    _train, val = split_indices(ds, config)
    val = evenly_by_class(val, ds.labels, max_images)
    with torch.random.fork_rng():  # without pretrained weights ("none"), the random start the run had, the
        torch.manual_seed(config.seed)  # same on every call (it drew from whatever the process had drawn before)
        pretrained = create_model(config.model, weights=config.weights, class_names=list(ds.class_names))
    pretrained.spec = tuned.spec  # the same preprocessing the run saw (size, crop, mean/std)
    return [feature_map(pretrained, ds, val, name=f"pretrained {config.model} ({config.weights})", method=method, k=k),
            feature_map(tuned, ds, val, name=f"after fine-tune (run {run.run_id})", method=method, k=k)]


def model_map(model: str, data: str, *, weights: str = "packaged", image_size: int | None = None,
              method: str = "pca", k: int = 5, max_per_class: int | None = 50, max_images: int | None = None,
              seed: int = 0) -> FeatureMap:
    """A pretrained backbone's map of a dataset's validation images (the default 80/20 split), at most
    ``max_images`` of them when given (taken evenly over classes)."""
    from dataclasses import replace

    from engine.config import TrainConfig
    from engine.data.datasets import load_source
    from engine.data.splits import split_indices
    from engine.models.factory import create_model

    ds = load_source(data)
    config = TrainConfig(model=model, weights=weights, data=data, max_per_class=max_per_class, split_seed=seed)
    _train, val = split_indices(ds, config)
    if max_images:
        val = evenly_by_class(val, ds.labels, max_images)
    handle = create_model(model, weights=weights, class_names=list(ds.class_names))
    if image_size:
        handle.spec = replace(handle.spec, input_size=(3, image_size, image_size))
    return feature_map(handle, ds, val, name=f"pretrained {model} ({weights})", method=method, k=k, seed=seed)
