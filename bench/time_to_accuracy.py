"""Time to accuracy: the plain tutorial loop and the engine, each timed from its own process's start (issue 29).

Both contenders train the same model (efficientnet_lite0 with the packaged ImageNet weights, a new
head, every layer trained) on the same data, image size, batch (32) and epochs, on the same number of
threads, one after the other. Each runs in a fresh subprocess that this bench starts, the clock read
(``time.time()``) just before starting it, so imports, data loading and model set-up all count. For
each, the bench prints the seconds from that start until the validation accuracy first reaches the
plain loop's best minus 1 point (the two validation splits differ: the target is not the very best).

The plain loop (``plain_child`` below) is the PyTorch transfer-learning tutorial's: a torchvision
dataset, a ``DataLoader`` (batch 32, shuffled, no workers), AdamW lr 1e-3 on every parameter, a
``train()`` epoch of zero_grad / forward / loss / backward / step, then ``eval()`` over the validation
images under ``no_grad``; after each epoch it prints a JSON line with the time and accuracy. It takes
the model from ``engine.models.factory.create_model`` only to get the same architecture with the same
packaged (offline) weights and a new head; nothing else of the engine runs in it.
  digits: scikit-learn's 1,797 digits, each resized (to RGB) and normalised once into a ``TensorDataset``
          (tensors prepared once), a random 80/20 split.
  photos: ``ImageFolder`` over 5 classes of bench/photos.py (160 photos each, 800), a random 80/20
          split, training transforms RandomResizedCrop + horizontal flip, evaluation Resize + CenterCrop.
The engine runs twice: as told (``python -m engine train --strategy full``, the plain loop's plan) and as
recommended (``--strategy auto``: the advisor and a short race on a sample pick the plan before the first
epoch, engine/training/auto_plan.py; the bench prints what it picked and why), each with the same epochs, image size and batch
(its own defaults otherwise: its stratified 80/20 split, its learning rate and schedule, no
augmentation); the bench stamps each of its ``epoch N: ...`` lines as it arrives (printed after the
epoch's validation and checkpoints) and reads the exact accuracy from the run's metrics.jsonl.
Both children get OMP_NUM_THREADS/MKL_NUM_THREADS = --threads (the plain one also calls
``torch.set_num_threads``), and the engine a fresh runs, data and lock folder.

  python bench/time_to_accuracy.py                   # both cases: digits 96 px 3 epochs, photos 224 px 2 epochs
  python bench/time_to_accuracy.py --case digits     # ~2-3 minutes on an idle 2-core machine
  python bench/time_to_accuracy.py --quick           # smoke run: fewer images and epochs (~1-2 minutes)
  python bench/time_to_accuracy.py --epochs 5 --threads 4 --engine-args "--lr 1e-3"

Duration (bench/run_all.py runs the full default, both cases): on an idle 2-core machine about 2 minutes
for digits and 5-6 for photos, 7-8 in all (estimated from the epochs seen at low load; the engine's
calibration and open-set pass after its last epoch included); on a shared 2-core box (load ~3.5) one run took 25 minutes, and two threads' epochs there
swing several-fold (16 s and 129 s for the same plain epoch), so read single numbers from a busy
machine as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "timm:efficientnet_lite0"
BATCH = 32
VAL_FRACTION = 0.2
PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
# per case: image size, epochs, images per class (None: all); --quick's epochs and images per class
CASES = {
    "digits": {"image_size": 96, "epochs": 3, "per_class": None, "quick_epochs": 2, "quick_per_class": 40},
    "photos": {"image_size": 224, "epochs": 2, "per_class": 160, "quick_epochs": 1, "quick_per_class": 24},
}
EPOCH_LINE = re.compile(r"^epoch (\d+): .*\| val loss \S+ acc ([0-9.]+)")


# ---------------------------------------------------------------- the plain tutorial loop (its own process)

def plain_child(spec: dict) -> None:
    """The tutorial loop; prints one JSON line when ready to train and one after every epoch's evaluation."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from torchvision import datasets, transforms

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    size = spec["image_size"]
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if spec["case"] == "digits":
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep, count = [], {}
        for i, label in enumerate(digits.target):  # --quick: the first N images of each class
            count[label] = count.get(label, 0) + 1
            if spec["per_class"] is None or count[label] <= spec["per_class"]:
                keep.append(i)
        tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), normalize])
        x = torch.stack([tf(Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB"))
                         for i in keep])  # tensors prepared once
        y = torch.as_tensor(digits.target[keep])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_val = int(len(y) * spec["val_fraction"])
        train_ds = TensorDataset(x[order[n_val:]], y[order[n_val:]])
        val_ds = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        classes = [str(i) for i in range(10)]
    else:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size),
                                     transforms.ToTensor(), normalize])
        train_all = datasets.ImageFolder(spec["data"], train_tf)
        val_all = datasets.ImageFolder(spec["data"], val_tf)
        order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = int(len(order) * spec["val_fraction"])
        train_ds, val_ds = Subset(train_all, order[n_val:]), Subset(val_all, order[:n_val])
        classes = train_all.classes
    train_loader = DataLoader(train_ds, batch_size=spec["batch"], shuffle=True)
    val_loader = DataLoader(val_ds, batch_size=spec["batch"])

    sys.path.insert(0, spec["root"])
    from engine.models.factory import create_model  # only for the model with the packaged weights and a new head

    model = create_model(MODEL, class_names=classes).module
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(json.dumps({"ready": time.time(), "train": len(train_ds), "val": len(val_ds),
                      "threads": torch.get_num_threads()}), flush=True)
    for epoch in range(1, spec["epochs"] + 1):
        began = time.time()
        model.train()
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
        trained = time.time()
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, labels in val_loader:
                correct += (model(inputs).argmax(1) == labels).sum().item()
        now = time.time()
        print(json.dumps({"epoch": epoch, "t": now, "val_acc": correct / len(val_ds), "train_s": trained - began,
                          "eval_s": now - trained}), flush=True)


# ---------------------------------------------------------------- the bench (parent)

def _env(threads: int, scratch: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               WORKBENCH_RUNS=str(scratch / "runs"), WORKBENCH_DATA=str(scratch / "data"),
               WORKBENCH_LOCKS=str(scratch / "locks"))
    env.pop("WORKBENCH_NICE", None)
    return env


def _launch(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; every output line stamped with the time it arrived; the clock read just before the start."""
    lines: list[tuple[float, str]] = []
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                            bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    rc = proc.wait()
    end = time.time()
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(f"a contender failed (exit {rc}): {shlex.join(cmd)}\n{tail}")
    return {"start": start, "end": end, "lines": lines, "load": load}


def run_plain(spec: dict, env: dict[str, str]) -> dict:
    out = _launch([sys.executable, str(Path(__file__).resolve()), "--plain-child", json.dumps(spec)], env)
    epochs, ready = [], None
    for _, text in out["lines"]:
        if text.startswith("{"):
            row = json.loads(text)
            if "ready" in row:
                ready = row
            else:
                epochs.append({"epoch": row["epoch"], "t": row["t"] - out["start"], "val_acc": row["val_acc"],
                               "train_s": row["train_s"], "eval_s": row["eval_s"]})
    return {"name": "plain", "epochs": epochs, "total_s": out["end"] - out["start"], "load": out["load"],
            "setup_s": ready["ready"] - out["start"] if ready else None,
            "images": f"{ready['train']} train / {ready['val']} val" if ready else "?"}


def run_engine(spec: dict, env: dict[str, str], scratch: Path, extra: list[str]) -> dict:
    runs = scratch / "runs"
    cmd = [sys.executable, "-m", "engine", "train", "--data", spec["data"], "--strategy", "full",
           "--epochs", str(spec["epochs"]), "--image-size", str(spec["image_size"]), "--batch-size", str(spec["batch"]),
           "--val-fraction", str(spec["val_fraction"]), "--out", str(runs), "--json"]
    if spec["per_class"]:
        cmd += ["--max-per-class", str(spec["per_class"])]
    out = _launch(cmd + extra, env)
    stamps = {}
    for stamp, text in out["lines"]:
        match = EPOCH_LINE.match(text)
        if match:
            stamps.setdefault(int(match.group(1)), (stamp - out["start"], float(match.group(2))))
    run = next(p for p in runs.iterdir() if p.is_dir())
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    epochs = []
    for epoch, (t, printed) in sorted(stamps.items()):
        row = rows.get(epoch, {})
        epochs.append({"epoch": epoch, "t": t, "val_acc": row.get("val_acc", printed), "epoch_s": row.get("epoch_s"),
                       "elapsed_s": row.get("elapsed_s")})
    status = json.loads((run / "status.json").read_text())
    auto = json.loads((run / "config.json").read_text()).get("auto_plan") or {}
    split = status.get("split") or {}
    first = epochs[0] if epochs else None
    return {"name": "engine", "epochs": epochs, "total_s": out["end"] - out["start"], "load": out["load"],
            "created_s": status["created_at"] - out["start"] if "created_at" in status else None,
            # when fit() started its clock (imports and the CLI before it): the first epoch's arrival less its elapsed_s
            "setup_s": first["t"] - first["elapsed_s"] if first and first.get("elapsed_s") is not None else None,
            # from fit()'s start to the first epoch line, less the epoch's steps: data, model, the batch plan (and
            # the choice of plan), then the epoch's validation, BatchNorm statistics and checkpoint
            "prepare_s": first["elapsed_s"] - first["epoch_s"] if first and first.get("epoch_s") is not None else None,
            "images": f"{split.get('train', '?')} train / {split.get('val', '?')} val",
            "batches": status.get("batches"), "picked": status.get("auto_plan") if auto else None}


def _reached(result: dict, target: float) -> dict | None:
    return next((e for e in result["epochs"] if e["val_acc"] >= target - 1e-9), None)


def _cpu() -> str:
    sys.path.insert(0, str(ROOT))
    from engine.training.precision import cpu_info  # what the engine's bf16 probe reads

    model, flags = cpu_info()
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"CPU: {model}, {os.cpu_count()} cores; avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"AMX {'yes (' + ' '.join(amx) + ')' if amx else 'no'}")


def bench_case(case: str, args: argparse.Namespace, variants: list[list[str]]) -> list[str]:
    settings = CASES[case]
    epochs = args.epochs or settings["quick_epochs" if args.quick else "epochs"]
    per_class = settings["quick_per_class" if args.quick else "per_class"]
    spec = {"case": case, "image_size": settings["image_size"], "epochs": epochs, "batch": BATCH,
            "threads": args.threads, "val_fraction": VAL_FRACTION, "root": str(ROOT), "per_class": None,
            "data": "digits"}
    if case == "digits":
        spec["per_class"] = per_class
    else:
        sys.path.insert(0, str(HERE))
        from photos import make_photos

        spec["data"] = str(make_photos(HERE / ".cache" / f"photos{len(PHOTO_CLASSES)}-{per_class}", per_class,
                                       classes=PHOTO_CLASSES))
    label = (f"{case} at {spec['image_size']} px, {epochs} epoch{'s' if epochs > 1 else ''}"
             + (f", {per_class} images a class" if per_class else ""))
    print(f"== {label}, batch {BATCH}, {args.threads} threads", flush=True)
    results = []
    for extra in [None, *variants]:  # the plain loop first, then each engine variant
        name = "plain" if extra is None else "engine"
        scratch = Path(tempfile.mkdtemp(prefix=f"tta-{case}-{name}-"))
        try:
            env = _env(args.threads, scratch)
            result = run_plain(spec, env) if extra is None else run_engine(spec, env, scratch, extra)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result["label"] = name if not extra else f"engine {shlex.join(extra)}"
        results.append(result)
        print(f"   {result['label']}: {result['images']}, "
              + ", ".join(f"epoch {e['epoch']} {e['val_acc']:.4f} at {e['t']:.1f}s" for e in result["epochs"])
              + f"; exited at {result['total_s']:.1f}s (load {result['load']:.1f} at its start)", flush=True)
        if result.get("picked"):
            print(f"     {result['picked']}", flush=True)
    plain = results[0]
    target = max(e["val_acc"] for e in plain["epochs"]) - 0.01
    plain_hit = _reached(plain, target)
    lines = []
    for result in results:
        hit = _reached(result, target)
        best = max(e["val_acc"] for e in result["epochs"])
        reached = f"{hit['t']:.1f} s (epoch {hit['epoch']})" if hit else "not reached"
        ratio = f"{plain_hit['t'] / hit['t']:.2f}x" if result is not plain and hit and plain_hit else ""
        lines.append(f"{case:<7} {result['label']:<22} {best:>12.4f} {target:>7.4f}  {reached:>22}  {ratio:>12}")
    lines += [_breakdown(plain, engine) for engine in results[1:]]
    return lines


def _breakdown(plain: dict, engine: dict) -> str:
    """Where each contender's seconds went: before its first training step, each epoch, after the last."""
    def epochs_text(result: dict, key: str) -> str:
        return "/".join(f"{e[key]:.1f}" for e in result["epochs"] if e.get(key) is not None)

    plain_epochs = "/".join(f"{e['train_s']:.1f}+{e['eval_s']:.1f}" for e in plain["epochs"])
    p_setup = f"{plain['setup_s']:.1f}" if plain["setup_s"] is not None else "?"
    e_setup = f"{engine['setup_s']:.1f}" if engine["setup_s"] is not None else "?"
    e_prepare = f"{engine['prepare_s']:.1f}" if engine.get("prepare_s") is not None else "?"
    created = f" (run folder made at {engine['created_s']:.1f} s)" if engine.get("created_s") is not None else ""
    last_p = plain["epochs"][-1]["t"] if plain["epochs"] else 0.0
    last_e = engine["epochs"][-1]["t"] if engine["epochs"] else 0.0
    return (f"        plain:  start-up + data + model {p_setup} s, epochs (train+eval) {plain_epochs} s, exit "
            f"{plain['total_s'] - last_p:.1f} s after the last\n"
            f"        engine: start-up to fit() {e_setup} s{created}, then outside the first epoch's steps (set-up, its validation "
            f"and checkpoint) {e_prepare} s, "
            f"epochs {epochs_text(engine, 'epoch_s')} s, "
            f"exit {engine['total_s'] - last_e:.1f} s after the last epoch line; {engine.get('batches') or ''}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="both", choices=["digits", "photos", "both"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer images and epochs")
    parser.add_argument("--epochs", type=int, help="epochs for both contenders (default: digits 3, photos 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine-args", default="", help="more options for `python -m engine train`, e.g. '--lr 1e-3'")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="an engine contender with these options instead (repeat: each runs after the one plain "
                        "loop, e.g. --variant '' --variant '--progressive-from 48')")
    parser.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_child:
        plain_child(json.loads(args.plain_child))
        return
    print(_cpu())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; efficientnet_lite0 (packaged weights), "
          f"full fine-tune, batch {BATCH}; the clock starts just before each contender's process", flush=True)
    # the engine as told (--strategy full, as the plain loop) and as recommended (--strategy auto: the plan it picks)
    variants = [shlex.split(v) for v in args.variant] or [shlex.split(args.engine_args),
                                                           [*shlex.split(args.engine_args), "--strategy", "auto"]]
    lines = []
    for case in ("digits", "photos") if args.case == "both" else (args.case,):
        lines += bench_case(case, args, variants)
    print(f"\n{'case':<7} {'who':<22} {'best val acc':>12} {'target':>7}  {'to target from start':>22}  "
          f"{'plain/engine':>12}")
    print("\n".join(lines))
    print("target: the plain loop's best validation accuracy minus 0.01; goals: plain/engine >= 3x on both cases "
          "with --strategy full, >= 6x with --strategy auto")


if __name__ == "__main__":
    main()
