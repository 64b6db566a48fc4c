"""Prediction runs in eval + inference mode with the model's own transform, batched."""
from __future__ import annotations

import torch

from engine.data.images import open_image
from engine.data.transforms import eval_transform
from engine.models.factory import create_model
from engine.outputs.predict import predict_images, predict_sources


def test_eval_transform_follows_the_spec(default_handle, cat_photo):
    t = eval_transform(default_handle.spec)
    x = t(open_image(cat_photo))
    assert tuple(x.shape) == (3, 224, 224)
    assert x.min() >= -1.0001 and x.max() <= 1.0001  # mean = std = 0.5 maps [0,1] to [-1,1]
    assert tuple(eval_transform(default_handle.spec, image_size=96)(open_image(cat_photo)).shape) == (3, 96, 96)


def test_batched_equals_single_and_training_flag_restored(cat_photo, coffee_photo):
    handle = create_model("timm:test_efficientnet", weights="none", class_names=["a", "b", "c"])
    handle.module.train()
    images = [open_image(cat_photo), open_image(coffee_photo), open_image(cat_photo)]
    together = predict_images(handle, images, top_k=3, batch_size=2)
    alone = [predict_images(handle, [im], top_k=3)[0] for im in images]
    assert handle.module.training
    for a, b in zip(together, alone):
        assert [t.index for t in a] == [t.index for t in b]
        assert all(abs(x.prob - y.prob) < 1e-5 for x, y in zip(a, b))
        assert abs(sum(t.prob for t in a) - 1.0) < 1e-4  # 3 classes, top-3 covers all
    assert together[0][0].label in {"a", "b", "c"}


def test_bad_files_are_listed_and_good_ones_still_predicted(default_handle, cat_photo, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG garbage")
    results = predict_sources(default_handle, [("junk.png", junk), ("cat.png", cat_photo.read_bytes())], top_k=2)
    assert results[0].error and results[0].topk is None
    assert results[1].error is None and len(results[1].topk) == 2
    assert "error" not in results[1].to_dict()


def test_eval_mode_is_used_for_prediction(cat_photo):
    handle = create_model("timm:test_resnet", weights="none")
    running = handle.module.bn1.running_mean.clone()
    handle.module.train()
    predict_images(handle, [open_image(cat_photo)] * 2)
    assert torch.equal(handle.module.bn1.running_mean, running)
