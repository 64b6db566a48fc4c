"""Training throughput on the CPU: one process against N DistributedDataParallel processes (gloo).

The same recipe both ways (efficientnet_lite0 with its packaged weights, full fine-tune, digits at
96 px, batch 32), each an ordinary ``python -m engine train`` run; the figure is the training
images per second of each epoch as the run records it (metrics.jsonl, evaluation excluded). The
two ways alternate, and each reports its fastest and median epoch (the fastest is the one least
disturbed by other processes on the machine). The load average is printed beside them: on a
shared machine it says how much the figures can be trusted.

  python bench/ddp.py [--nproc 2] [--epochs 2] [--repeats 2] [--max-per-class 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: str, nproc: int, args: argparse.Namespace) -> list[float]:
    """One run; the training img/s of each of its epochs (a device lock of its own: a bench is not a user's run)."""
    env = {**os.environ, "WORKBENCH_LOCKS": os.path.join(out, "locks")}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "train", "--out", out, "--json", "--model", "timm:efficientnet_lite0",
         "--data", "digits", "--image-size", "96", "--strategy", "full", "--batch-size", "32",
         "--epochs", str(args.epochs), "--max-per-class", str(args.max_per_class), "--nproc", str(nproc)],
        cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed: {proc.stderr[-1500:]}")
    run_dir = Path(json.loads(proc.stdout)["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["images_per_s"] for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-per-class", type=int, default=60)
    args = parser.parse_args(argv)
    print(f"efficientnet_lite0, full fine-tune, digits at 96 px ({args.max_per_class} per class), batch 32, "
          f"{os.cpu_count()} CPU cores; load average before: {os.getloadavg()[0]:.2f}")
    speeds: dict[int, list[float]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as out:
        for _ in range(args.repeats):
            for n in speeds:
                speeds[n] += train(out, n, args)
    for n, values in speeds.items():
        print(f"{n} process{'es' if n > 1 else ''}: fastest {max(values):.1f} img/s, median "
              f"{statistics.median(values):.1f} img/s over {len(values)} epochs")
    ratio = max(speeds[args.nproc]) / max(speeds[1])
    print(f"{args.nproc} processes / 1 process (fastest): {ratio:.2f}x; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
