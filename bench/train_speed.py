"""Training speed and memory against a plain tutorial loop (prints ratios; not a test).

Same model (efficientnet_lite0, packaged weights), data (digits, 96 px), batch size 32.
  python bench/train_speed.py            # all measurements
  python bench/train_speed.py --quick    # fewer batches
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from engine.config import TrainConfig  # noqa: E402
from engine.freeze.plan import FreezePlan  # noqa: E402
from engine.training.loop import fit  # noqa: E402
from engine.training.setup import prepare


def plain_epoch(model, loader, optimizer, max_batches=None, channels_last=False, bf16=False) -> tuple[float, int]:
    """The textbook loop: train(), zero_grad, forward, loss, backward, step."""
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return time.perf_counter() - start, seen


def plain_epoch_frozen_bn(model, loader, optimizer, max_batches) -> tuple[float, int]:
    """The textbook loop, the model's modes as the caller set them (its frozen BatchNorm in eval)."""
    seen, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= max_batches:
            break
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig()
    prep = prepare(cfg)
    batches = 12 if args.quick else None

    # frozen backbone: plain loop recomputes the backbone every epoch; ours caches features
    model = prep.handle.module
    for p in model.parameters():
        p.requires_grad = False
    for p in prep.handle.head_module.parameters():
        p.requires_grad = True
    loader = DataLoader(prep.train_ds, batch_size=32, shuffle=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    plain_s, plain_n = plain_epoch(model, loader, opt, batches)
    plain_rate = plain_n / plain_s
    frozen = fit(TrainConfig(plan=FreezePlan.feature_extraction(head_lr=1e-2).to_dict(), epochs=3))
    later = [h["images_per_s"] for h in frozen.history[1:]]
    print(f"frozen backbone: plain loop {plain_rate:.0f} img/s; ours after epoch 1 "
          f"{min(later):.0f} img/s -> {min(later) / plain_rate:.0f}x (goal >= 20x); "
          f"val acc {frozen.best_val_acc:.3f} after 3 epochs ({frozen.seconds:.1f}s total)")

    # full fine-tune throughput: plain loop vs channels_last vs CPU bf16
    rates = {}
    for name, kw in {"plain": {}, "channels_last": {"channels_last": True},
                     "bf16 autocast (CPU)": {"bf16": True}}.items():
        prep = prepare(cfg)
        model = prep.handle.module
        if kw.get("channels_last"):
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(prep.train_ds, batch_size=32, shuffle=True)
        seconds, seen = plain_epoch(model, loader, opt, batches or 20, **kw)
        rates[name] = seen / seconds
    for name, rate in rates.items():
        print(f"fine-tune {name}: {rate:.0f} img/s ({rate / rates['plain']:.2f}x plain)")

    # last 2 stages: the plain loop runs the frozen stages on every step; ours runs them once (prefix_cache.py)
    prep = prepare(cfg)
    model = prep.handle.module
    top = ("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")

    def in_top(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in top)

    for name, p in model.named_parameters():
        p.requires_grad = in_top(name)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for name, m in model.named_modules():  # frozen BatchNorm in eval mode, as the engine's default policy
        if name and not in_top(name) and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    seconds, seen = plain_epoch_frozen_bn(model, DataLoader(prep.train_ds, batch_size=32, shuffle=True), opt,
                                          batches or 20)
    plain_top = seen / seconds
    last2 = FreezePlan.last(2, head_lr=2e-3, backbone_lr_ratio=1.0).to_dict()
    ours = fit(TrainConfig(plan=last2, epochs=2))
    rate = min(h["images_per_s"] for h in ours.history)
    print(f"last 2 stages: plain loop {plain_top:.0f} img/s; ours {rate:.0f} img/s ({rate / plain_top:.1f}x, the frozen "
          f"stages once; {ours.seconds:.1f}s for 2 epochs with the cache pass), val acc {ours.best_val_acc:.3f}")

    start = time.perf_counter()
    result = fit(cfg)
    print(f"default training (full fine-tune, 1 epoch): {time.perf_counter() - start:.1f}s, "
          f"val acc {result.best_val_acc:.3f}, ours {result.history[0]['images_per_s']:.0f} img/s "
          f"({result.history[0]['images_per_s'] / rates['plain']:.2f}x plain)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
