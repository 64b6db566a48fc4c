"""The nn.Module lesson: tree, counts, buffers and per-module output shapes from the live model."""
from __future__ import annotations

import torch

from engine.anatomy.tree import module_tree, summarize
from engine.models.factory import create_model


def test_resnet18_summary_rows_shapes_and_buffers():
    handle = create_model("tv:resnet18", weights="none", num_classes=10)
    s = summarize(handle.module, (3, 224, 224))
    rows = {r.name: r for r in s.rows}
    assert s.total_params == 11_689_512 - 513_000 + 5_130
    assert s.output_shape == [1, 10]
    assert rows[""].output_shape == [1, 10]
    assert rows["conv1"].output_shape == [1, 64, 112, 112]
    assert rows["layer4"].output_shape == [1, 512, 7, 7]
    assert rows["fc"].params == 512 * 10 + 10 and rows["fc"].own_params == 5_130
    # BatchNorm carries buffers: running mean/var (+ the batch counter)
    assert set(rows["bn1"].buffer_names) == {"running_mean", "running_var", "num_batches_tracked"}
    assert rows["bn1"].buffers == 64 + 64 + 1
    assert rows["relu"].params == 0
    assert "ResNet(" in s.text and "(fc): Linear(in_features=512, out_features=10" in s.text


def test_summary_tracks_trainable_and_leaves_model_untouched():
    handle = create_model("timm:test_resnet", weights="none")
    model = handle.module
    for p in model.parameters():
        p.requires_grad = False
    for p in model.fc.parameters():
        p.requires_grad = True
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summarize(model, (3, 64, 64), batch=2)
    assert s.trainable_params == sum(p.numel() for p in model.fc.parameters())
    assert s.frozen_params == s.total_params - s.trainable_params
    assert s.input_shape == [2, 3, 64, 64] and s.output_shape == [2, 1000]
    assert model.training, "train/eval flags must be restored"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during summarize"


def test_vit_summary_and_depth_limit():
    handle = create_model("timm:test_vit", weights="none", num_classes=3)
    s = summarize(handle.module, handle.spec.input_size, max_depth=1)
    assert max(r.depth for r in s.rows) == 1
    assert s.output_shape == [1, 3]
    tree = module_tree(handle.module, max_depth=2)
    assert tree["params"] == s.total_params
    assert {c["name"] for c in tree["children"]} >= {"patch_embed", "blocks", "head"}
    # a ViT keeps cls_token and pos_embed on the root module itself
    assert tree["own_params"] > 0
    assert sum(c["params"] for c in tree["children"]) + tree["own_params"] == tree["params"]


def test_summary_shapes_come_from_its_own_forward_while_another_thread_predicts(cat_photo):
    """The Model page's summary hooks a shared cached model: a prediction running on it from another
    session at that moment must never leak its batch of 3 into the shapes shown (batch 1)."""
    import threading

    from engine.data.images import open_image
    from engine.outputs.predict import predict_images

    handle = create_model("timm:test_resnet", weights="none", class_names=["a", "b", "c"])
    images = [open_image(cat_photo)] * 3
    stop, errors = threading.Event(), []

    def predictor():
        try:
            while not stop.is_set():
                predict_images(handle, images, top_k=1, batch_size=3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=predictor)
    thread.start()
    try:
        summaries = [summarize(handle.module, (3, 64, 64)) for _ in range(15)]
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not errors, errors
    for s in summaries:
        assert {tuple(r.output_shape[:1]) for r in s.rows if r.output_shape} == {(1,)}
