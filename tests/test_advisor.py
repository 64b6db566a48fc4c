"""Advisor: the data x similarity matrix, similarity estimated from real data, BN gap measured."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.anatomy.stages import model_stages
from engine.core.errors import EngineError
from engine.data.transforms import eval_transform
from engine.freeze.plan import FreezePlan, apply_plan
from engine.lab.advisor import batchnorm_train_eval_gap, estimate_similarity, recommend


def _digits(per_class=12):
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(d.target == c), per_class, replace=False) for c in range(10)])
    images = [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)) .convert("RGB") for i in idx]
    return images, d.target[idx]


def _faces(n=60):
    from skimage.data import lfw_subset

    faces = lfw_subset()  # first 100 faces, then 100 non-faces
    idx = list(range(n // 2)) + list(range(100, 100 + n // 2))
    images = [Image.fromarray((faces[i] * 255).astype(np.uint8)).convert("RGB") for i in idx]
    return images, [1] * (n // 2) + [0] * (n // 2)


@pytest.mark.parametrize(
    "per_class, similarity, strategy",
    [(500, "similar", "feature-extraction"), (500, "different", "full"),
     (20, "similar", "feature-extraction"), (20, "different", "last-n")],
)
def test_the_matrix(per_class, similarity, strategy):
    advice = recommend(per_class, 5, similarity)
    assert advice.strategy == strategy
    assert advice.data_amount == ("enough" if per_class >= 100 else "little")
    assert advice.explanation
    FreezePlan.from_dict(advice.plan)  # a valid plan the trainer can use


def test_little_and_different_unfreezes_gradually():
    plan = FreezePlan.from_dict(recommend(10, 3, "different").plan)
    assert plan.unfreeze_schedule and plan.last_n == 1


def test_recommend_rejects_nonsense():
    with pytest.raises(EngineError):
        recommend(10, 1, "similar")
    with pytest.raises(EngineError):
        recommend(10, 3, "kind of")


def test_similarity_estimated_on_real_data_separates_faces_from_digits(default_handle):
    faces = estimate_similarity(default_handle, *_faces(), image_size=96)
    digits = estimate_similarity(default_handle, *_digits(), image_size=96)
    assert faces.verdict == "similar" and faces.probe_accuracy > 0.9
    assert digits.score < faces.score
    assert digits.chance == pytest.approx(0.1) and faces.chance == pytest.approx(0.5)
    assert recommend(180, 10, digits).strategy in {"full", "last-n"}
    assert recommend(100, 2, faces).strategy == "feature-extraction"


def test_similarity_needs_two_classes_with_two_images(default_handle):
    images, _ = _faces(4)
    with pytest.raises(EngineError):
        estimate_similarity(default_handle, images, [0, 0, 0, 0])
    with pytest.raises(EngineError):
        estimate_similarity(default_handle, images[:3], [0, 0, 1])


def test_batchnorm_gap_is_measured_without_touching_the_model(default_handle):
    images, _ = _digits(2)
    x = torch.stack([eval_transform(default_handle.spec, 96)(im) for im in images[:16]])
    state = {k: v.clone() for k, v in default_handle.module.state_dict().items()}
    stages = model_stages(default_handle.module, default_handle.spec.head)
    gap = batchnorm_train_eval_gap(default_handle, x)
    assert gap.bn_layers > 10 and gap.mean_abs > 0.01 and gap.relative > 0.05
    for k, v in default_handle.module.state_dict().items():
        assert torch.equal(v, state[k])
    # the same number even when the model has a freeze plan applied (hooks do not leak into the copy)
    apply_plan(default_handle.module, stages, FreezePlan.feature_extraction())
    try:
        again = batchnorm_train_eval_gap(default_handle, x)
        assert again.mean_abs == pytest.approx(gap.mean_abs, rel=1e-4)
    finally:
        apply_plan(default_handle.module, stages, FreezePlan.full())
