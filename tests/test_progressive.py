"""Progressive resizing (engine/training/sizes.py): the sizes per epoch, the batches the model really
sees, and the settings it refuses."""
from __future__ import annotations

import pytest
import torch

from engine.anatomy.stages import model_stages
from engine.config import ConfigError, TrainConfig
from engine.models.factory import create_model
from engine.runs.store import create_run
from engine.training import setup as training_setup
from engine.training.loop import fit
from engine.training.sizes import epoch_size, recalibrate_batchnorm, resize_batch


def test_sizes_grow_linearly_to_the_image_size_in_steps_of_8():
    assert [epoch_size(e, 3, 48, 96) for e in (1, 2, 3)] == [48, 72, None]
    assert [epoch_size(e, 4, 112, 224) for e in (1, 2, 3, 4)] == [112, 152, 184, None]
    assert epoch_size(1, 1, 48, 96) is None  # one epoch: only its last
    assert epoch_size(1, 3, None, 96) is None
    assert epoch_size(1, 2, 22, 96) == 24  # rounded to 8 px
    assert epoch_size(1, 5, 94, 96) is None  # rounds up to the image size: no resize at all


def test_a_batch_is_scaled_by_its_longer_side_with_antialiasing():
    x = torch.zeros(2, 3, 64, 32)
    x[..., ::2, :] = 1.0  # one-pixel stripes: antialiasing averages them, plain bilinear would pick one phase
    y = resize_batch(x, 32)
    assert y.shape == (2, 3, 32, 16)
    assert torch.allclose(y[..., 4:-4, :], torch.full_like(y[..., 4:-4, :], 0.5), atol=0.05)


def test_a_run_trains_its_early_epochs_small_and_validates_at_its_own_size(tmp_path, monkeypatch):
    config = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
                         max_per_class=6, epochs=3, progressive_from=16, num_workers=0,
                         plan={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0})
    seen: list[tuple[bool, int]] = []  # (training, input size) of the real model's forwards of batches
    real = training_setup.create_model

    def watched(*args, **kwargs):
        handle = real(*args, **kwargs)
        handle.module.register_forward_pre_hook(  # a batch of one is a set-up check, not a step or an evaluation
            lambda m, inputs: seen.append((m.training, inputs[0].shape[-1])) if len(inputs[0]) > 1 else None)
        return handle

    monkeypatch.setattr(training_setup, "create_model", watched)
    result = fit(config, create_run(tmp_path, config.to_dict()))
    assert result.status == "finished", result.reason
    trained = [size for training, size in seen if training]
    evaluated = {size for training, size in seen if not training}
    assert set(trained) == {16, 24, 32} and trained.index(24) > trained.index(16) and trained[-1] == 32
    assert evaluated == {32}


def test_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="below the image size") as exc:
        TrainConfig(image_size=96, progressive_from=96)
    assert exc.value.field == "progressive_from"
    with pytest.raises(ConfigError, match="between 16"):
        TrainConfig(progressive_from=8)
    vit = create_model("timm:test_vit", weights="none", class_names=["a", "b"])
    config = TrainConfig(model="timm:test_vit", weights="none", image_size=None, progressive_from=24)  # patches of 16
    with pytest.raises(ConfigError, match="takes smaller images"):
        config.validate_for_model(vit.module, model_stages(vit.module, vit.spec.head), vit.spec.input_size[-1])


def test_batchnorm_takes_the_full_size_statistics_and_keeps_its_momentum():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.1))
    model[0].running_mean.fill_(5.0)  # what a small-size epoch left
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g) + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1),
                torch.zeros(8)) for _ in range(5)]
    used = recalibrate_batchnorm(model, batches, torch.device("cpu"), channels_last=False, micro_batch=4, images=24)
    assert used == 24
    assert torch.allclose(model[0].running_mean, torch.tensor([1.0, 2.0, 3.0]), atol=0.1)
    assert model[0].momentum == 0.1 and model.training


def test_auto_starts_at_four_sevenths_from_192_px_and_the_cli_records_the_size(tmp_path, capsys):
    from engine.cli import main
    from engine.training.sizes import auto_start

    assert auto_start(224, 2) == 128 and auto_start(192, 5) == 112 and auto_start(384, 3) == 216
    assert auto_start(160, 5) is None and auto_start(224, 1) is None and auto_start(None, 5) is None
    assert main(["train", "--progressive-from", "big", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "auto or off" in err
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_the_page_says_what_auto_does_at_the_size():
    from engine.training.sizes import progressive_caption

    assert progressive_caption(224, 3) == ("Progressive resizing: the epochs train at 128 -> 176 -> 224 px; "
                                           "validation at 224 px.")
    assert progressive_caption(96, 3) == "Progressive resizing: every epoch at 96 px here (it pays from 192 px)."
    assert "one epoch" in progressive_caption(224, 1)


def test_batchnorm_statistics_measured_again_change_what_validation_sees_never_the_training():
    """``bn_recalibrate``: on/off/auto over the same seeded full fine-tune. A training forward normalises with
    its own batch, so the training losses are equal to the bit; validation normalises with the running
    statistics, so it differs. Under cosine, auto measures after the first of 2 epochs (ending at ~0.6 of
    the peak LR) and not after the last (0.01)."""
    from engine.freeze.plan import FreezePlan
    from engine.training.policies import lr_factor
    from engine.training.sizes import recalibrates

    base = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=20, epochs=2,
                batch_size=16, num_workers=0, plan=FreezePlan.full(head_lr=1e-2, backbone_lr_ratio=1.0).to_dict())
    runs = {s: fit(TrainConfig(**base, bn_recalibrate=s)).history for s in ("on", "off", "auto")}
    for row in zip(*runs.values()):
        assert len({r["train_loss"] for r in row}) == 1, row
    assert all(on["val_loss"] != off["val_loss"] for on, off in zip(runs["on"], runs["off"]))
    assert runs["auto"][0]["val_loss"] == runs["on"][0]["val_loss"]
    steps = 10  # 160 training images, 16 a step
    assert lr_factor(steps - 1, 2 * steps, "cosine", 0.1) > 0.5 > lr_factor(2 * steps - 1, 2 * steps, "cosine", 0.1)
    assert [recalibrates("auto", False, share) for share in (0.6, 0.01)] == [True, False]
    assert recalibrates("off", True, 0.0) and recalibrates("on", False, 0.0) and not recalibrates("off", False, 1.0)
    with pytest.raises(ConfigError, match="bn_recalibrate"):
        TrainConfig(**base, bn_recalibrate="sometimes").validate()
