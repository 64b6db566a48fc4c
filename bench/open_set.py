"""How well a run tells "none of my classes" (engine/runs/open_set.py), measured as docs/open-set.md
reports it: a real run is trained (feature extraction on the packaged ImageNet backbone), its rule fitted
at the end of the run as always (threshold: the 95% quantile of its validation images' distances), and
then four kinds of images it never saw are scored:

  known   held-out images of its own classes (a test split): flagged should be about 5%, at most 10%
  far     another kind of image altogether (natural photos for a digits model, digits for a photo model)
  near    other classes of the same kind (digits 5-9 for a model of 0-4; other photos for a photo model)

Beside the rule (k = 1, and k = 5 for comparison), the calibrated top-1 probability with its threshold
set the same way (flag below the 5% quantile of the validation images' confidence).

  python bench/open_set.py [--digits-per-class 100] [--photos-per-class 40] [--epochs 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
OTHER_PHOTOS = ("hubble_deep_field", "ihc", "retina", "brick", "grass")


def _digits_folder(out: Path, digits: range, per_class: int) -> Path:
    from engine.data.datasets import load_source

    folder = out / f"digits-{digits.start}-{digits.stop - 1}-{per_class}"
    if folder.is_dir():
        return folder
    ds = load_source("digits")
    counts: dict[int, int] = {}
    for i, label in enumerate(ds.labels):
        name = int(ds.class_names[label])
        if name in digits and counts.get(name, 0) < per_class:
            counts[name] = counts.get(name, 0) + 1
            target = folder / str(name) / f"{i:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.image(i).save(target)
    return folder


def _photo_folder(out: Path, classes: tuple[str, ...], per_class: int) -> Path:
    sys.path.insert(0, str(HERE))
    from photos import make_photos

    source = make_photos(out / "photos", per_class=per_class)
    folder = out / ("photos-" + "-".join(c[:4] for c in classes) + f"-{per_class}")
    if not folder.is_dir():
        for name in classes:
            (folder / name).mkdir(parents=True, exist_ok=True)
            for f in sorted((source / name).glob("*.jpg"))[:per_class]:
                (folder / name / f.name).write_bytes(f.read_bytes())
    return folder


def _features_and_confidence(handle, ds, indices: list[int], temperature: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.training.feature_cache import embed

    feats = embed(handle, ds, indices)
    head = handle.module.get_submodule(handle.spec.head)
    with torch.inference_mode():
        logits = head(feats).float()
    return feats, (logits / (temperature or 1.0)).softmax(-1).max(-1).values


def measure(name: str, data: Path, image_size: int, epochs: int, out: Path, others: dict[str, Path]) -> dict:
    from engine.config import TrainConfig
    from engine.data.datasets import load_source
    from engine.data.splits import split_all
    from engine.freeze.plan import FreezePlan
    from engine.runs.calibration import run_temperature
    from engine.runs.load import load_run_model
    from engine.runs.open_set import knn_distance
    from engine.runs.open_set import run_open_set as rule_of
    from engine.runs.store import create_run
    from engine.training.loop import fit

    config = TrainConfig(data=str(data), image_size=image_size, epochs=epochs, num_workers=0, test_fraction=0.2,
                         plan=FreezePlan.parse("feature-extraction").to_dict())
    run = create_run(out / "runs", config.to_dict())
    result = fit(config, run)
    handle, rule, temperature = load_run_model(run.path), rule_of(run), run_temperature(run)
    ds = load_source(config.data)
    _train, val, test = split_all(ds, config)
    val_feats, val_conf = _features_and_confidence(handle, ds, val, temperature)
    conf_threshold = float(torch.quantile(val_conf.double(), 0.05))
    k5_threshold = float(torch.quantile(knn_distance(rule.bank, val_feats, 5).double(), 0.95))
    rows = {}
    sets = {"known (held-out)": (ds, test), **{k: (load_source(str(p)), None) for k, p in others.items()}}
    for label, (images, indices) in sets.items():
        indices = indices if indices is not None else list(range(len(images.labels)))
        feats, conf = _features_and_confidence(handle, images, indices, temperature)
        rows[label] = {"images": len(indices),
                       "k=1 (the rule)": float(rule.unknown(rule.scores(feats)).float().mean()),
                       "k=5": float((knn_distance(rule.bank, feats, 5) > k5_threshold).float().mean()),
                       "calibrated probability": float((conf < conf_threshold).float().mean())}
    print(f"\n{name}: {len(ds.class_names)} classes {ds.class_names}, val acc {result.best_val_acc:.3f}, "
          f"rule: k={rule.k}, threshold {rule.threshold:.3f} on {len(val)} validation images, bank {rule.bank.shape[0]}")
    print(f"{'flagged unknown':<28}{'images':>7}{'k=1 (the rule)':>16}{'k=5':>8}{'calibrated p':>14}")
    for label, r in rows.items():
        print(f"{label:<28}{r['images']:>7}{r['k=1 (the rule)']:>16.1%}{r['k=5']:>8.1%}{r['calibrated probability']:>14.1%}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-per-class", type=int, default=100)
    parser.add_argument("--photos-per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10, help="cheap: feature extraction trains on cached features")
    parser.add_argument("--out", type=Path, default=HERE / ".cache" / "open-set")
    args = parser.parse_args(argv)
    out, digits, photos = args.out, args.digits_per_class, args.photos_per_class
    torch.manual_seed(0)
    measure("digits 0-4 (64 px)", _digits_folder(out, range(0, 5), digits), 64, args.epochs, out,
            {"near: digits 5-9": _digits_folder(out, range(5, 10), digits // 2),
             "far: natural photos": _photo_folder(out, PHOTO_CLASSES + OTHER_PHOTOS, photos // 2)})
    measure("photos, 5 classes (224 px)", _photo_folder(out, PHOTO_CLASSES, photos), 224, args.epochs, out,
            {"near: 5 other photo classes": _photo_folder(out, OTHER_PHOTOS, photos),
             "far: digits": _digits_folder(out, range(0, 10), photos // 2)})


if __name__ == "__main__":
    main()
