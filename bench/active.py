"""Active learning on digits: does labelling what the model is unsure of (engine.lab.active) need fewer
labels than labelling at random?

The set-up, built to run in a few minutes on 2 CPU cores: the 1,797 scikit-learn digits through the
engine's offline default backbone (efficientnet_lite0, packaged ImageNet weights, frozen) once, at
``--image-size`` px, with the features the feature map uses (``engine.lab.feature_map.embed``); then
for each labelling a linear head (logistic regression on standardised features) is trained anew, which
is feature extraction, the regime the product recommends for little data. Per seed, a stratified
30 % is held out for testing and the rest is the unlabelled pool; both strategies start from the same
5 labels per class and add 20 labels per round, 5 rounds (50 -> 150 labels):

- random: 20 images of the pool drawn at random;
- active: ``rank_pool(uncertainty(probs), features, 20, diversity)``, exactly the product's ranking
  (``data suggest``), on the head's probabilities for the images still unlabelled.

Random labelling then goes on (to ``--random-max`` labels) so that the number of labels it needs to
match each accuracy of the active curve can be read off (linear interpolation between rounds, on the
mean over seeds). The figures are in docs/active-learning.md.

  python bench/active.py [--seeds 3] [--image-size 224] [--head-c 0.1] [--variants margin:0.5 margin:0 entropy:0.5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

START_PER_CLASS = 5
ROUNDS = 5
PER_ROUND = 20


def digit_features(image_size: int) -> tuple[torch.Tensor, np.ndarray, float]:
    """Frozen efficientnet_lite0 features of every digit (cached in the temp folder), labels, seconds."""
    from dataclasses import replace

    from engine.data.datasets import load_digits_set
    from engine.models.factory import create_model
    from engine.training.feature_cache import embed

    ds = load_digits_set()
    cache = Path(tempfile.gettempdir()) / f"workbench-bench-active-lite0-{image_size}.pt"
    labels = np.asarray(ds.labels)
    if cache.is_file():
        return torch.load(cache, weights_only=True), labels, 0.0
    start = time.perf_counter()
    handle = create_model("timm:efficientnet_lite0", weights="packaged", class_names=list(ds.class_names))
    handle.spec = replace(handle.spec, input_size=(3, image_size, image_size))
    feats = embed(handle, ds, list(range(len(ds))))
    torch.save(feats, cache)
    return feats, labels, time.perf_counter() - start


HEAD_C = 0.1  # the head's inverse L2 strength (--head-c); docs/active-learning.md gives the figures at 1.0 too


def train_head(x: np.ndarray, y: np.ndarray, c: float = HEAD_C):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000).fit(x, y)


def run_strategy(x: np.ndarray, y: np.ndarray, pool: np.ndarray, test: np.ndarray, start: np.ndarray,
                 rounds: int, strategy: str, seed: int, c: float = HEAD_C) -> list[float]:
    """Test accuracy after the start set and after each round of PER_ROUND labels."""
    from engine.lab.active import rank_pool, uncertainty

    rng = np.random.default_rng(seed + 1000)
    labelled = list(start)
    accs = []
    for r in range(rounds + 1):
        head = train_head(x[labelled], y[labelled], c)
        accs.append(float((head.predict(x[test]) == y[test]).mean()))
        if r == rounds:
            break
        rest = np.setdiff1d(pool, labelled)
        if strategy == "random":
            picked = rng.choice(rest, PER_ROUND, replace=False)
        else:
            score, diversity = strategy.split(":")
            probs = torch.from_numpy(head.predict_proba(x[rest]))
            order = rank_pool(uncertainty(probs, score), torch.from_numpy(x[rest]), PER_ROUND, float(diversity))
            picked = rest[order]
        labelled.extend(int(i) for i in picked)
    return accs


def labels_to_reach(curve: list[float], budgets: list[int], target: float) -> float | None:
    """The labels a mean curve needs to reach ``target``, interpolated between rounds; None: never."""
    for i, acc in enumerate(curve):
        if acc >= target:
            if i == 0:
                return float(budgets[0])
            lo, hi = curve[i - 1], acc
            return budgets[i - 1] + (budgets[i] - budgets[i - 1]) * (target - lo) / (hi - lo)
    return None


def main(argv: list[str] | None = None) -> None:
    from sklearn.model_selection import train_test_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-c", type=float, default=HEAD_C, help="the linear head's inverse L2 strength")
    parser.add_argument("--variants", nargs="+", default=["margin:0.5", "margin:0", "entropy:0.5"],
                        help="score:diversity of engine.lab.active; the first is the product's default")
    parser.add_argument("--random-max", type=int, default=450, help="random labelling goes on to this many labels")
    args = parser.parse_args(argv)

    feats, y, seconds = digit_features(args.image_size)
    x_all = feats.numpy().astype(np.float64)
    x_all = (x_all - x_all.mean(0)) / (x_all.std(0) + 1e-6)  # unsupervised: no label is used
    print(f"digits: {len(y)} images, efficientnet_lite0 (packaged, frozen) at {args.image_size} px, "
          f"{x_all.shape[1]} features" + (f" extracted in {seconds:.0f} s" if seconds else " (cached)")
          + f"; logistic-regression head, C={args.head_c:g}", flush=True)
    budgets = [START_PER_CLASS * 10 + PER_ROUND * r for r in range(ROUNDS + 1)]
    random_rounds = max(ROUNDS, (args.random_max - budgets[0]) // PER_ROUND)
    random_budgets = [budgets[0] + PER_ROUND * r for r in range(random_rounds + 1)]
    curves: dict[str, list[list[float]]] = {v: [] for v in ["random", *args.variants]}
    start_time = time.perf_counter()
    for seed in range(args.seeds):
        idx = np.arange(len(y))
        pool, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.choice(pool[y[pool] == c], START_PER_CLASS, replace=False) for c in range(10)])
        curves["random"].append(run_strategy(x_all, y, pool, test, start, random_rounds, "random", seed, args.head_c))
        for v in args.variants:
            curves[v].append(run_strategy(x_all, y, pool, test, start, ROUNDS, v, seed, args.head_c))
    print(f"{args.seeds} seeds, {len(test)} test images each, {time.perf_counter() - start_time:.0f} s of rounds\n")

    mean = {k: [statistics.mean(c[i] for c in v) for i in range(len(v[0]))] for k, v in curves.items()}
    spread = {k: [statistics.pstdev(c[i] for c in v) for i in range(len(v[0]))] for k, v in curves.items()}
    names = ["random", *args.variants]
    print("labels  " + "  ".join(f"{n:>18}" for n in names))
    for i, b in enumerate(budgets):
        print(f"{b:>6}  " + "  ".join(f"{mean[n][i]:>10.1%} ±{spread[n][i]:5.1%}" for n in names))
    extra = [(b, mean["random"][i]) for i, b in enumerate(random_budgets) if b > budgets[-1]]
    if extra:
        print("random goes on: " + ", ".join(f"{b} {a:.1%}" for b, a in extra[::2]))

    print("\nlabels needed to reach the accuracy the active strategy has after each round (mean of seeds):")
    for v in args.variants:
        print(f"  {v}:")
        ratios = []
        for i, b in enumerate(budgets[1:], 1):
            target = mean[v][i]
            own = labels_to_reach(mean[v], budgets, target)
            rand = labels_to_reach(mean["random"], random_budgets, target)
            ratio = rand / own if rand and own else None
            if ratio:
                ratios.append(ratio)
            shown = f"{rand:.0f}" if rand else f"> {random_budgets[-1]}"
            print(f"    {target:.1%}: active {own:.0f} labels, random {shown} -> "
                  + (f"{ratio:.2f}x fewer" if ratio else f"more than {random_budgets[-1] / own:.2f}x fewer"))
        final = mean[v][-1]
        rand_final = labels_to_reach(mean["random"], random_budgets, final)
        verdict = (f"{rand_final / budgets[-1]:.2f}x" if rand_final else f"> {random_budgets[-1] / budgets[-1]:.2f}x")
        print(f"    at {budgets[-1]} labels ({final:.1%}) random needs {verdict} as many labels "
              f"(goal: >= 1.5x)")


if __name__ == "__main__":
    main()
