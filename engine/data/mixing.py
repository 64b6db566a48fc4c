"""Mixup and cutmix: a training batch blended with itself reversed, labels blended alike.

Batch-level, in the training step only (never evaluation): each image i is mixed with image n-1-i
of the same batch (``x.flip(0)``, as timm's Mixup in 'batch' mode); with weight ``lam`` drawn from
Beta(alpha, alpha) mixup blends whole images, cutmix pastes a box of area 1 - lam (lam is then the
box's true share). When both are on, each batch picks one with probability 1/2. The targets are the
two one-hot labels (label smoothing applied) blended with the same ``lam``, so the loss is the cross
entropy against soft targets.

Written out rather than timm's Mixup so that the draws come from torch's CPU generator (seeded per
epoch like dropout, the same on any device) and a batch of odd size still works; the exported
script carries the same function.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blended images, soft targets of shape (n, num_classes)) for one batch ``x`` (n, C, H, W)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    else:
        x = x * lam + partner * (1.0 - lam)
    off = smoothing / num_classes
    one_hot = torch.full((y.shape[0], num_classes), off, device=y.device)
    one_hot.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)
    return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def batch_mixer(mixup: float, cutmix: float, num_classes: int, smoothing: float = 0.0) -> Mixer | None:
    """The training step's mixer for these settings; None when neither mixup nor cutmix is on."""
    if not (mixup or cutmix):
        return None
    return lambda x, y: mix_batch(x, y, num_classes, mixup, cutmix, smoothing)
