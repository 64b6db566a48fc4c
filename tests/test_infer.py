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


def test_one_shared_model_serves_grad_cam_and_predict_from_two_threads_at_once(cat_photo, coffee_photo):
    """The app's cached model is shared by every session: a Grad-CAM's hooks and mode switches in one
    thread never change another thread's predictions, and the model ends exactly as it started."""
    import threading

    from engine.outputs.explain import grad_cam

    handle = create_model("timm:test_resnet", weights="none", class_names=["a", "b", "c"])
    module = handle.module
    module.eval()
    module.layer1.requires_grad_(False)  # a partly frozen model: grad_cam must give these flags back
    cat, coffee = open_image(cat_photo), open_image(coffee_photo)
    want_pred = [[(t.index, round(t.prob, 5)) for t in r] for r in predict_images(handle, [cat, coffee], top_k=3)]
    want_cam = grad_cam(handle, cat).heatmap
    modes = {n: m.training for n, m in module.named_modules()}
    grads = {n: p.requires_grad for n, p in module.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())
    errors, got_pred, got_cam = [], [], []

    def predictor():
        try:
            for _ in range(25):
                got_pred.append([[(t.index, round(t.prob, 5)) for t in r]
                                 for r in predict_images(handle, [cat, coffee], top_k=3)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def explainer():
        try:
            for _ in range(8):
                got_cam.append(grad_cam(handle, cat).heatmap)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=predictor), threading.Thread(target=explainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    def same(a, b):  # float sums may differ in the last bits when threads share the cores
        return all([i for i, _ in x] == [i for i, _ in y] and all(abs(p - q) < 1e-4 for (_, p), (_, q) in zip(x, y))
                   for x, y in zip(a, b))

    assert len(got_pred) == 25 and all(same(p, want_pred) for p in got_pred)
    assert len(got_cam) == 8 and all(torch.allclose(torch.as_tensor(c), torch.as_tensor(want_cam), atol=1e-5)
                                     for c in got_cam)
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert {n: p.requires_grad for n, p in module.named_parameters()} == grads
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules()) == hooks
