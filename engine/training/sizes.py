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


def epoch_size(epoch: int, epochs: int, start: int | None, final: int) -> int | None:
    """The training size of ``epoch`` (1-based) of ``epochs``; None: the image size itself."""
    if start is None or epochs < 2 or epoch >= epochs or start >= final:
        return None
    size = start + (final - start) * (epoch - 1) / (epochs - 1)
    size = max(STEP_PX * 2, int(round(size / STEP_PX)) * STEP_PX)
    return size if size < final else None


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of square-or-not images scaled so that its longer side is ``size`` (antialiased: a
    plain bilinear downscale aliases thin strokes away, which a digit is made of)."""
    h, w = x.shape[-2:]
    shape = (max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w))))
    return F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)
