"""Test-time augmentation on CPU: the images and their mirrors in one forward of 2N images, or in two
forwards of N (what ``engine.outputs.predict.class_probs`` does, having measured this), each in slices
of ``core.memory.inference_batch``.

efficientnet_lite0 with its packaged ImageNet weights at 224 px, random inputs (speed only); the two
ways alternate, and each reports its fastest and its median of a few repeats per batch size N (the
fastest is the one least disturbed by other processes), after a warm-up. When N is a whole number of
slices both ways run the same forwards.

  python bench/tta.py [--repeats 5] [--sizes 1 4 8 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _forward(module, x: torch.Tensor, step: int) -> torch.Tensor:
    return torch.cat([module(x[s:s + step]).float().softmax(-1) for s in range(0, len(x), step)])


def main(argv: list[str] | None = None) -> None:
    from engine.core.memory import inference_batch
    from engine.models.factory import create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args(argv)

    module = create_model("timm:efficientnet_lite0").module.eval()
    step = inference_batch(module, (3, 224, 224))
    print(f"efficientnet_lite0 224 px, {torch.get_num_threads()} threads, model-sized slices of {step}")
    torch.manual_seed(0)
    with torch.inference_mode():
        _forward(module, torch.randn(2, 3, 224, 224), step)  # warm-up
        for n in args.sizes:
            x = torch.randn(n, 3, 224, 224)
            times = {"one forward of 2N": [], "two forwards of N": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                _forward(module, torch.cat([x, x.flip(-1)]), step)
                times["one forward of 2N"].append(time.perf_counter() - start)
                start = time.perf_counter()
                _forward(module, x, step), _forward(module, x.flip(-1), step)
                times["two forwards of N"].append(time.perf_counter() - start)
            cells = "  ".join(f"{k}: best {min(v) * 1000:7.1f} ms ({2 * n / min(v):5.1f} img/s), "
                              f"median {statistics.median(v) * 1000:7.1f} ms" for k, v in times.items())
            print(f"N={n:<3} {cells}")


if __name__ == "__main__":
    main()
