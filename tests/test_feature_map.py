"""The feature-space map: real models on real images, the projection, and the separability score."""
from __future__ import annotations

import pytest
import torch

from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan
from engine.lab.feature_map import knn_accuracy, model_map, project, run_maps
from engine.runs.store import create_run
from engine.training.loop import fit


def test_knn_accuracy_is_one_for_separate_clusters_and_chance_for_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 10
    labels = [i % 4 for i in range(200)]
    clusters = centres[labels] + torch.randn(200, 32, generator=g) * 0.1
    assert knn_accuracy(clusters, labels, k=5) == 1.0
    noise = torch.randn(200, 32, generator=g)
    assert 0.1 < knn_accuracy(noise, labels, k=5) < 0.45  # chance is 0.25


def test_pca_finds_the_axis_the_classes_differ_on():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g) * 0.1
    x[:50, 3] += 5.0  # the classes differ along feature 3 only
    points, explained = project(x)
    first = torch.tensor([p[0] for p in points])
    assert explained[0] > 0.9 and len(points) == 100 and len(points[0]) == 2
    assert (first[:50].mean() - first[50:].mean()).abs() > 4.0


def test_pretrained_imagenet_features_separate_faces_better_than_a_random_network():
    """The picture behind the case matrix: a similar task is already separable before any training."""
    pretrained = model_map("timm:efficientnet_lite0", "lfw", weights="packaged", image_size=96, max_per_class=40)
    random = model_map("timm:efficientnet_lite0", "lfw", weights="none", image_size=96, max_per_class=40)
    assert pretrained.sources == random.sources and len(pretrained.points) == len(pretrained.labels) == 16
    assert pretrained.dims == 1280 and sorted(pretrained.class_names) == ["face", "non-face"]
    assert pretrained.knn_acc >= 0.9 and pretrained.knn_acc > random.knn_acc, (pretrained.knn_acc, random.knn_acc)


def test_a_run_is_mapped_beside_its_pretrained_backbone_on_the_same_images(tmp_path):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=30,
                         epochs=4, num_workers=0, plan=FreezePlan.full(head_lr=3e-3).to_dict())
    run = create_run(tmp_path, config.to_dict())
    assert fit(config, run).status == "finished"
    before, after = run_maps(str(run.path), max_images=40)
    assert before.sources == after.sources and len(after.points) == 40
    assert before.model.startswith("pretrained") and run.run_id in after.model
    assert after.knn_acc > before.knn_acc  # training made the classes separable


def test_the_cli_maps_a_model_and_refuses_what_it_cannot_map(tmp_path):
    import json

    from tests.hostile._cli import engine

    ran = engine("features", "timm:efficientnet_lite0", "--data", "lfw", "--image-size", "64", "--max-per-class", "20",
                 "--json")
    assert ran.rc == 0, ran.err[-2000:]
    (only,) = json.loads(ran.out)
    assert len(only["points"]) == len(only["labels"]) == 8 and 0 <= only["knn_acc"] <= 1 and only["method"] == "pca"
    engine("features", "timm:efficientnet_lite0").assert_one_line_error("needs --data")
    engine("features", "no-such-run", "--out", str(tmp_path)).assert_one_line_error("no run at")


def test_k_stays_below_the_smallest_class_and_the_map_says_which_k_it_used():
    """Two classes of two images each, perfectly apart: 5 neighbours outvote each image's one
    same-class neighbour (a separable set scored 0.00); the k the data allows is 1."""
    from engine.lab.feature_map import usable_k

    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    labels = [0, 0, 1, 1]
    assert knn_accuracy(points, labels, k=5) == 0.0
    assert usable_k(labels, 5) == 1 and knn_accuracy(points, labels, k=usable_k(labels, 5)) == 1.0
    assert usable_k([0] * 10 + [1] * 10, 5) == 5


def test_a_map_refuses_one_class_no_images_and_a_run_whose_classes_changed(tmp_path):
    import shutil

    from engine.core.errors import DataError, RunError
    from tests.hostile._cli import engine
    from tests.test_overrides import _digits_folder

    folder = _digits_folder(tmp_path / "digits", per_class=10, classes=(0, 1))
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(folder), image_size=32, epochs=1,
                         num_workers=0, plan=FreezePlan.full(head_lr=3e-3).to_dict())
    run = create_run(tmp_path / "runs", config.to_dict())
    assert fit(config, run).status == "finished"
    (before, after) = run_maps(str(run.path))
    assert after.k == before.k == 1  # 2 validation images a class: one neighbour of its own
    shutil.rmtree(folder / "1")  # the data lost a class since the run trained
    with pytest.raises(RunError, match="other classes"):
        run_maps(str(run.path))
    one = _digits_folder(tmp_path / "one", per_class=10, classes=(3,))
    few = _digits_folder(tmp_path / "few", per_class=1, classes=(0, 1))
    for data, phrase in ((one, "of one class only"), (few, "No validation images")):
        with pytest.raises(DataError, match=phrase):
            model_map("timm:test_resnet", str(data), weights="none", image_size=32)
    engine("features", "timm:no-such-model", "--data", "digits").assert_one_line_error("unknown model")
