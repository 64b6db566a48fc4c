"""The feature-space map: real models on real images, the projection, and the separability score."""
from __future__ import annotations

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
