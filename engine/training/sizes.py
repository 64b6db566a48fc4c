"""Progressive resizing: early epochs train on smaller images, the last on the run's own size.

Why: a step's cost grows with the pixels, and a pretrained network already knows what it sees at
any scale; what the early epochs of a fine-tune mostly do (turn a new head and nudge the features
towards the task) needs fewer pixels than the last ones (fastai's and EfficientNetV2's progressive
resizing, here without growing the regularisation with it). Validation, checkpoints, exports and
predictions always use the run's image size: the batch is resized on the way into the model, so the
data pipeline, its caches and its decoded images are the same for every epoch.

The sizes go linearly from ``progressive_from`` (the first epoch) to the image size (the last
epoch), in steps of 8 px; a run of one epoch has only its last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STEP_PX = 8
# "auto": from this image size on, the first epoch trains at AUTO_SHARE of it. Measured (bench/time_to_accuracy.py,
# efficientnet_lite0, 2 cores): 5 photo classes at 224 px from 128, validation 0.99 after the first epoch at 15.9 s
# instead of 29.4 s; digits at 96 px from 48 or 64 lost more accuracy in the first epoch than it saved time (20.8 s
# to 0.948 instead of 15.5 s), so below AUTO_FROM_PX every epoch trains at the image size.
AUTO_FROM_PX = 192
AUTO_SHARE = 4 / 7  # 128 px of 224


def epoch_size(epoch: int, epochs: int, start: int | None, final: int) -> int | None:
    """The training size of ``epoch`` (1-based) of ``epochs``; None: the image size itself."""
    if start is None or epochs < 2 or epoch >= epochs or start >= final:
        return None
    size = start + (final - start) * (epoch - 1) / (epochs - 1)
    size = max(STEP_PX * 2, int(round(size / STEP_PX)) * STEP_PX)
    return size if size < final else None


def auto_start(image_size: int | None, epochs: int) -> int | None:
    """What ``progressive_from`` "auto" resolves to: a first size for runs of two or more epochs at
    AUTO_FROM_PX or more, else None (every epoch at the image size)."""
    if not image_size or epochs < 2 or image_size < AUTO_FROM_PX:
        return None
    return max(STEP_PX * 2, int(round(image_size * AUTO_SHARE / STEP_PX)) * STEP_PX)


def progressive_caption(image_size: int, epochs: int) -> str:
    """What 'auto' does at this size and number of epochs, in one line (the Training page says it)."""
    start = auto_start(image_size, epochs)
    if start is None:
        why = "one epoch" if epochs < 2 else f"it pays from {AUTO_FROM_PX} px"
        return f"Progressive resizing: every epoch at {image_size} px here ({why})."
    sizes = [epoch_size(e, epochs, start, image_size) or image_size for e in range(1, epochs + 1)]
    shown = sizes if len(sizes) <= 6 else [*sizes[:3], "...", *sizes[-2:]]
    return f"Progressive resizing: the epochs train at {' -> '.join(map(str, shown))} px; validation at {image_size} px."


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of square-or-not images scaled so that its longer side is ``size`` (antialiased: a
    plain bilinear downscale aliases thin strokes away, which a digit is made of)."""
    h, w = x.shape[-2:]
    shape = (max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w))))
    return F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)


RECALIBRATE_IMAGES = 256  # training images whose statistics the BatchNorm layers take at the full size
RECALIBRATE_ABOVE = 0.5  # bn_recalibrate auto: after an epoch that ends at this share of the peak LR or more


def recalibrates(setting: str, small_size: bool, lr_share: float) -> bool:
    """Whether an epoch ends with its BatchNorm statistics measured again (``recalibrate_batchnorm``).

    Always after a small-size epoch (validation at the full size). Otherwise per ``bn_recalibrate``: with
    ``auto``, when the epoch's last step ran at ``RECALIBRATE_ABOVE`` of the peak LR or more. Why: the
    running averages (momentum 0.1, about the last ten steps) lag weights that still move fast, and
    validation normalises with them. Digits at 96 px, full fine-tune, 3 epochs, seeds 0-3: the first
    epoch validated at 0.908-0.950 (mean 0.928) with the running averages and 0.958-0.975 (mean 0.964)
    with the statistics measured again (with the fused AdamW step tried that day; with the looped one, as
    it stands: 0.950-0.969, mean 0.958, loss 0.133-0.164, against 0.961-0.975, mean 0.968, loss
    0.096-0.134); the training itself is the same (a training forward normalises with its batch). At the end of a cosine schedule they no longer lag: the last epochs validated the
    same either way (0.986-0.994 against 0.983-0.992), so ``auto`` spends the forwards only where they pay."""
    return small_size or setting == "on" or (setting == "auto" and lr_share >= RECALIBRATE_ABOVE)


def recalibrate_batchnorm(model: torch.nn.Module, loader, device: torch.device, *, channels_last: bool,
                          micro_batch: int | None, images: int = RECALIBRATE_IMAGES) -> int:
    """After an epoch at a smaller size: the training BatchNorm layers' running statistics measured
    again at the full size (a cumulative average over forwards of up to ``images`` training images,
    no gradients), so that validation at the full size normalises with the statistics it sees.

    Why: a layer's activations change with the input's scale, and the running statistics of a small-size
    epoch misnormalise full-size images (digits at 96 px after an epoch at 48-64 px validated at 10-14%).
    Returns the images used (0: no layer to recalibrate)."""
    from engine.freeze.plan import set_train_mode

    set_train_mode(model, True)
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the forwards below
    seen = 0
    try:
        with torch.no_grad():
            for x, _y in loader:
                x = x[: images - seen].to(device, non_blocking=True)
                for xs in x.split(micro_batch or len(x)):
                    if len(xs) < 2:
                        continue  # one image: one value per channel in a 1x1 map
                    model(xs.contiguous(memory_format=torch.channels_last) if channels_last else xs)
                seen += len(x)
                if seen >= images:
                    break
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return seen
