"""Photos at 224 px: peak memory and throughput of training, feature extraction and evaluation,
each beside a plain torchvision loop on the same data (prints figures and ratios; not a test).

Every measurement runs in its own process, so each peak RSS is that job's alone. Targets (issue 12):
full fine-tune peak <= 1.7 GB and >= 2.5x the plain loop's img/s; feature extraction <= 1.5 GB;
evaluation <= 1.3 GB. Also kept to the training's budget: last-stage fine-tuning (its frozen layers keep
nothing for backward, but run) and a race of the five freeze plans (all in memory at once). The engine runs under a 1.7 GB budget, the training target, set explicitly since
this machine has more (a Community Cloud box gives a training 2.7 GB minus the app's 1.2 GB = 1.5 GB
by default). Hosts differ: on a Xeon with AVX-512/AMX (2026-11-27) one fp32 step of slices of 4-8
ran 21-23 img/s against 26 on the host of the earlier figures, while the plain loop ran about the same.

  python bench/fit_224.py            # 2,000 photos (200 a class), efficientnet_lite0, batch 32
  python bench/fit_224.py --quick    # 400 photos
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET = "1.7GB"

PLAIN = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
torch.manual_seed(0)
data, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[4]
tf = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                         transforms.Normalize([0.5] * 3, [0.5] * 3)])
ds = datasets.ImageFolder(data, tf)
sys.path.insert(0, sys.argv[3])
from engine.models.factory import create_model  # only for the same model with the same packaged weights
model = create_model("timm:efficientnet_lite0", class_names=ds.classes).module
if mode == "frozen":  # the tutorial's feature extraction: backbone frozen, the whole model runs every step
    for p in model.parameters():
        p.requires_grad = False
    for p in model.get_classifier().parameters():
        p.requires_grad = True
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
loader = DataLoader(ds, batch_size=64 if mode == "eval" else 32, shuffle=True)
model.train(mode != "eval")
seen, start = 0, None
for i, (x, y) in enumerate(loader):
    if i == 1:
        start, seen = time.perf_counter(), 0  # the first step pays one-off set-up costs
    if i > steps:
        break
    if mode == "eval":
        with torch.no_grad():
            model(x)
    else:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    seen += len(y)
print(json.dumps({"img_s": seen / (time.perf_counter() - start),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan
from engine.runs.store import create_run
from engine.training.loop import fit
data, runs, strategy, budget = sys.argv[2:6]
plan = {"full": FreezePlan.full(head_lr=1e-3), "last-1": FreezePlan.last(1, head_lr=2e-3, backbone_lr_ratio=1.0)}.get(
    strategy) or FreezePlan.feature_extraction(head_lr=1e-2)
config = TrainConfig(data=data, image_size=224, crop_pct=0.875, batch_size=32, epochs=1, plan=plan.to_dict(),
                     memory_budget=budget)
run = create_run(runs, config.to_dict())
result = fit(config, run)
print(json.dumps({"img_s": result.history[0]["images_per_s"], "val_acc": result.best_val_acc,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "run": str(run.path),
                  "batches": run.status().batches, "seconds": result.seconds}))
"""

RACE = r"""
import json, os, resource, sys, tempfile
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("WORKBENCH_LOCKS", tempfile.mkdtemp())
from engine.config import TrainConfig
from engine.freeze.presets import PLANS
from engine.lab.race_process import train_race
from engine.lab.race_registry import create_race
data, runs, budget, seconds = sys.argv[2:6]
base = TrainConfig(data=data, image_size=224, crop_pct=0.875, batch_size=32, memory_budget=budget)
result = train_race(create_race(runs, base, PLANS, float(seconds)))
winner = next(row for row in result.leaderboard if row["winner"])
print(json.dumps({"winner": winner["strategy"], "val_acc": winner["best_val_acc"], "seconds": result.seconds,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

EVALUATE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from engine.outputs.evaluate import evaluate_run
from engine.runs.store import open_run
start = time.perf_counter()
result = evaluate_run(open_run(sys.argv[2], sys.argv[3]))
print(json.dumps({"val_acc": result.val_acc, "seconds": time.perf_counter() - start,
                  "img_s": result.val_images / (time.perf_counter() - start),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _job(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"a bench job failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from photos import make_photos

    per_class = 40 if args.quick else 200
    data = make_photos(HERE / ".cache" / f"photos-{per_class}", per_class)
    runs = HERE / ".cache" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    print(f"{10 * per_class} photos at 224 px, efficientnet_lite0 (packaged ImageNet weights), batch 32, "
          f"memory budget {BUDGET}")
    steps = "12" if args.quick else "40"
    plain = _job(PLAIN, str(data), steps, str(ROOT), "full")
    print(f"  plain torchvision loop, full fine-tune: {plain['img_s']:.1f} img/s, peak {plain['peak_mb']:.0f} MiB")
    full = _job(OURS, str(ROOT), str(data), str(runs), "full", BUDGET)
    ratio = full["img_s"] / plain["img_s"]
    print(f"  ours, full fine-tune: {full['img_s']:.1f} img/s ({ratio:.2f}x plain; goal >= 2.5x), peak "
          f"{full['peak_mb']:.0f} MiB = {full['peak_mb'] * 2**20 / 1e9:.2f} GB (goal <= 1.7 GB), val acc "
          f"{full['val_acc']:.3f}; {full['batches']}")
    plain_frozen = _job(PLAIN, str(data), steps, str(ROOT), "frozen")
    print(f"  plain loop, frozen backbone: {plain_frozen['img_s']:.1f} img/s, peak {plain_frozen['peak_mb']:.0f} MiB")
    frozen = _job(OURS, str(ROOT), str(data), str(runs), "feature-extraction", BUDGET)
    per_epoch = 0.8 * 10 * per_class / plain_frozen["img_s"]  # the plain loop runs the backbone every epoch
    print(f"  ours, feature extraction: {frozen['seconds']:.0f} s for the first epoch, feature pass included "
          f"(plain loop: {per_epoch:.0f} s every epoch), peak {frozen['peak_mb']:.0f} MiB = "
          f"{frozen['peak_mb'] * 2**20 / 1e9:.2f} GB (goal <= 1.5 GB), val acc {frozen['val_acc']:.3f}")
    last = _job(OURS, str(ROOT), str(data), str(runs), "last-1", BUDGET)
    print(f"  ours, last stage only: {last['img_s']:.1f} img/s, peak {last['peak_mb']:.0f} MiB = "
          f"{last['peak_mb'] * 2**20 / 1e9:.2f} GB (goal <= 1.7 GB: frozen layers keep nothing, yet run); {last['batches']}")
    race = _job(RACE, str(ROOT), str(data), str(runs), BUDGET, "30" if args.quick else "90")
    print(f"  ours, a race of five plans ({race['seconds']:.0f} s): peak {race['peak_mb']:.0f} MiB = "
          f"{race['peak_mb'] * 2**20 / 1e9:.2f} GB (goal <= 1.7 GB: every plan stays in memory), winner "
          f"{race['winner']} {race['val_acc']:.3f}")
    run = Path(full["run"])
    plain_eval = _job(PLAIN, str(data), steps, str(ROOT), "eval")
    print(f"  plain loop, inference (batch 64, no_grad): {plain_eval['img_s']:.1f} img/s, "
          f"peak {plain_eval['peak_mb']:.0f} MiB")
    evaluated = _job(EVALUATE, str(ROOT), str(run.parent), run.name)
    print(f"  ours, evaluate the fine-tuned run: peak {evaluated['peak_mb']:.0f} MiB = "
          f"{evaluated['peak_mb'] * 2**20 / 1e9:.2f} GB (goal <= 1.3 GB), {evaluated['img_s']:.1f} img/s with "
          "the model load")


if __name__ == "__main__":
    main()
