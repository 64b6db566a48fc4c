"""The GPU path beside timm's own train.py: same model, data, batch, precision and memory format
(prints both throughputs and the ratio; issue 15's goal is >= 0.9x timm's). Needs a CUDA GPU; on a
machine without one it says so and exits 0, so `make bench` still runs everywhere.

Both train efficientnet_lite0 from random init (throughput does not depend on the weights' values,
and the device machine cannot download) on the bench photos at 224 px, 80/20 split into train/ and
validation/ folders, AdamW, no augmentation, AMP (bf16 where the GPU has it, else fp16 with a
GradScaler), channels_last, pinned memory, the same loader workers. timm's figure is the running
average of its last epoch's log ("(0.130s, 492.13/s)"); ours is the last epoch's images_per_s.

  python bench/gpu_vs_timm.py [--per-class 400] [--batch 128] [--epochs 3] [--workers 8]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

OURS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan
from engine.runs.store import create_run
from engine.training.loop import fit
data, out, batch, epochs, workers, amp, size, device = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7], int(sys.argv[8]), sys.argv[9]
config = TrainConfig(model="timm:efficientnet_lite0", weights="none", data=data, epochs=epochs, batch_size=batch,
                     micro_batch=batch, image_size=size, plan=FreezePlan.full(head_lr=1e-3).to_dict(), device=device,
                     amp=amp, channels_last=True, num_workers=workers)
run = create_run(out, config.to_dict())
result = fit(config, run)
print(json.dumps({"status": result.status, "rows": run.metrics()}))
"""


def split_folders(photos: Path, dest: Path) -> Path:
    """train/ and validation/ of class folders (hard links, so no copy and no symlink to refuse)."""
    for cls in sorted(p for p in photos.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))
        cut = int(len(files) * 0.8)
        for split, part in (("train", files[:cut]), ("validation", files[cut:])):
            target = dest / split / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for f in part:
                os.link(f, target / f.name)
    return dest


def timm_rate(log: str) -> float | None:
    """The last running average img/s timm's train.py printed (its last epoch's steady state)."""
    rates = re.findall(r"\(\s*[\d.]+s,\s*([\d.]+)/s\)", log)
    return float(rates[-1]) if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 px, a few images: checks the script itself")
    args = parser.parse_args()
    import torch

    size, device = 224, "cuda"
    if args.smoke:
        args.per_class, args.batch, args.epochs, args.workers, size, device = 10, 16, 1, 0, 64, "cpu"
    elif not torch.cuda.is_available():
        print("gpu_vs_timm: no CUDA GPU here; this comparison runs only on a GPU machine (skipped).")
        return 0
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    amp = ("bf16" if bf16 else "fp16") if device == "cuda" else "off"
    from bench.photos import make_photos

    photos = make_photos(per_class=args.per_class)
    with tempfile.TemporaryDirectory(prefix="gpu-vs-timm-") as tmp:
        data = split_folders(photos, Path(tmp) / "data")
        n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
        common = dict(cwd=tmp, capture_output=True, text=True, timeout=3600)
        timm_cmd = [sys.executable, str(HERE / "vendor" / "timm_train.py"), "--data-dir", str(data), "--model",
                    "efficientnet_lite0", "--num-classes", str(len(list((data / "train").iterdir()))),
                    "--epochs", str(args.epochs), "-b", str(args.batch), "--input-size", "3", str(size), str(size),
                    "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--no-aug",
                    "--channels-last", "--pin-mem", "--workers", str(args.workers), "--log-interval", "10",
                    "--output", str(Path(tmp) / "timm")]
        if device == "cuda":
            timm_cmd += ["--amp", "--amp-dtype", "bfloat16" if bf16 else "float16"]
        else:
            timm_cmd += ["--device", "cpu"]
        timm = subprocess.run(timm_cmd, **common)
        rate_timm = timm_rate(timm.stdout + timm.stderr)
        ours = subprocess.run([sys.executable, "-c", OURS, str(ROOT), str(data), str(Path(tmp) / "runs"),
                               str(args.batch), str(args.epochs), str(args.workers), amp, str(size), device],
                              **common)
    rows = json.loads(ours.stdout.strip().splitlines()[-1])["rows"] if ours.returncode == 0 else []
    rate_ours = rows[-1]["images_per_s"] if rows else None
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"{where}: efficientnet_lite0, {n_train} train images at {size} px, batch {args.batch}, AMP {amp}, "
          f"channels_last, {args.workers} workers, epoch {args.epochs} of {args.epochs}")
    if rate_timm is None:
        print("timm train.py gave no rate:", (timm.stdout + timm.stderr)[-2000:])
    if rate_ours is None:
        print("the engine gave no rate:", (ours.stdout + ours.stderr)[-2000:])
    if rate_timm and rate_ours:
        ratio = rate_ours / rate_timm
        print(f"timm train.py {rate_timm:.0f} img/s | ours {rate_ours:.0f} img/s | ratio {ratio:.2f} "
              f"({'meets' if ratio >= 0.9 else 'below'} the 0.9x goal)")
        print(f"ours, val acc per epoch: {[round(r.get('val_acc', 0), 3) for r in rows]}")
    return 0 if rate_timm and rate_ours else 1


if __name__ == "__main__":
    sys.exit(main())
