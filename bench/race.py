"""The race's acceptance check: on digits at 96 px with 120 s on 2 threads, does the winner of a
race of five plans (successive halving, engine/lab/race.py) reach at least the validation accuracy
of the best single plan given the whole 120 s alone?

Every plan alone is trained exactly as the race trains (same split, seed, batch, LR, the same
step-level slicing: one rung of the whole budget, which as the last rung anneals by the clock), so the
only difference is the race itself.
A race is run for each --etas (2: 5 -> 3 -> 2 -> 1, 3: 5 -> 2 -> 1). It prints every number and the
verdict. ~15 minutes (7 x 120 s plus what runs late); the machine's load
average is printed beside each, since a busy machine slows whichever part it lands on.

  python bench/race.py [--budget 120] [--image-size 96] [--plans fe,last-1,last-2,full,gradual] [--etas 2 3]
                       [--seeds 0 1 2]   # ~15 minutes per seed
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from engine.config import TrainConfig
    from engine.lab.race_plans import parse_plans
    from engine.lab.race_process import train_race
    from engine.lab.race_registry import create_race, create_solo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--plans", default="fe,last-1,last-2,full,gradual")
    parser.add_argument("--model", default="timm:efficientnet_lite0")
    parser.add_argument("--etas", type=int, nargs="+", default=[2, 3], help="one race per eta (default: 2 and 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one race per eta and every plan alone per seed; the verdict compares means "
                        "(a single run's difference of one or two validation images is noise)")
    parser.add_argument("--alone", help="the plans given the budget alone (default: every plan raced); feature "
                        "extraction, far behind at 96 px, can be left out to save its minutes")
    parser.add_argument("--no-alone", action="store_true", help="only the races (compare with an earlier run's "
                        "plans alone)")
    parser.add_argument("--out", help="runs folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.environ.setdefault("WORKBENCH_LOCKS", tempfile.mkdtemp(prefix="race-bench-locks-"))
    out = Path(args.out or tempfile.mkdtemp(prefix="race-bench-"))
    plans = parse_plans(args.plans)
    alone_plans = [p.strip() for p in args.alone.split(",") if p.strip()] if args.alone else list(plans)
    if not set(alone_plans) <= set(plans):
        parser.error("--alone names plans that are not raced")
    base = TrainConfig(model=args.model, data="digits", image_size=args.image_size, batch_size=32)
    print(f"{args.model}, digits at {args.image_size} px, budget {args.budget:g} s, {torch.get_num_threads()} "
          f"threads, runs in {out}", flush=True)

    def load() -> str:
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())

    winners: dict[int, list[float]] = {eta: [] for eta in args.etas}  # per eta: the winner's accuracy per seed
    alone: dict[str, list[float]] = {}  # per plan: its accuracy alone per seed
    for seed in args.seeds:
        if len(args.seeds) > 1:
            print(f"seed {seed}", flush=True)
        config = replace(base, seed=seed)
        for eta in args.etas:
            print(f"race of {len(plans)} plans, eta {eta} ({load()})", flush=True)
            race = train_race(create_race(out, config, plans, args.budget, eta=eta),
                              say=lambda line: print("  " + line, flush=True))
            for row in race.leaderboard:
                print(f"  {row['place']}. {row['strategy']:<20} best {row['best_val_acc']:.4f} last "
                      f"{row['val_acc']:.4f} {row['epochs']:>3} epochs {row['images']:>6} images {row['train_s']:6.1f} s "
                      f"{'winner' if row['winner'] else 'out after rung ' + str(row['out_after_rung'])}", flush=True)
            winner = next(row for row in race.leaderboard if row["winner"])
            winners[eta].append(winner["best_val_acc"])
            print(f"race eta {eta}: {race.seconds:.1f} s, {race.rungs} of {race.rungs_planned} rungs"
                  f"{' (the budget ran out first)' if race.out_of_time else ''}, winner {winner['strategy']} best val "
                  f"acc {winner['best_val_acc']:.4f} ({load()})", flush=True)
        for name in () if args.no_alone else alone_plans:
            result = train_race(create_solo(out, config, name, args.budget))
            row = result.leaderboard[0]
            alone.setdefault(row["strategy"], []).append(row["best_val_acc"])
            print(f"alone: {row['strategy']:<20} best {row['best_val_acc']:.4f} last {row['val_acc']:.4f} "
                  f"{row['epochs']:>3} epochs {row['images']:>6} images {result.seconds:6.1f} s ({load()})", flush=True)
    if not alone:
        return 0

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    best_plan = max(alone, key=lambda name: mean(alone[name]))  # the best plan alone, on average over the seeds
    over = f" (mean of {len(args.seeds)} seeds)" if len(args.seeds) > 1 else ""
    ok = True
    for eta, accs in winners.items():
        passed = mean(accs) >= mean(alone[best_plan])
        ok = ok and passed
        print(f"verdict eta {eta}: race winner {mean(accs):.4f} vs best plan alone {best_plan} "
              f"{mean(alone[best_plan]):.4f}{over}: {'PASS' if passed else 'FAIL'} "
              f"(difference {mean(accs) - mean(alone[best_plan]):+.4f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
