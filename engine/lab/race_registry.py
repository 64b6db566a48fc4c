"""Races on disk: a race is one ordinary run per plan, in one group, with the race itself (budget, eta,
plan order, the estimate its budget was checked against) in each run's config, and what it recorded
in each run's status ``race``. Creating them (``create_race``, ``create_solo``), finding them, and
reading them back: the leaderboard, the curves, the winner (engine/lab/race.py runs them).
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.files import read_json
from engine.freeze.presets import LABELS, named_plan
from engine.lab.race_estimate import RaceEstimate, check_budget, estimate_race
from engine.lab.race_plans import ETA, backbone_stages, budget_value, parse_plans
from engine.runs.store import RunDir, create_run, list_runs, new_run_id


def create_race(runs_root: str | Path, base: TrainConfig, plans: tuple[str, ...], budget_s: float, *,
                eta: int = ETA, owner: int | None = None, estimate: RaceEstimate | None = None) -> list[RunDir]:
    """One queued run per plan, everything but the plan identical (data, split, seed, batch); the
    race itself (budget, eta, plan order, the estimate its budget was checked against) is written into
    each run's config. A budget the set-up and one slice per plan do not fit is refused first
    (``estimate``: one the caller made for these settings; else it is made here)."""
    plans = parse_plans(",".join(plans))
    if isinstance(eta, bool) or not isinstance(eta, int) or not 2 <= eta <= 10:
        raise EngineError(f"A race keeps the best 1/eta of the plans at each rung: eta is a whole number from 2 to 10 "
                          f"(got {eta!r}).")
    budget_value(budget_s)  # the cheap refusals before the probe
    estimate = estimate or estimate_race(base, plans)
    return _create(runs_root, base, plans, check_budget(budget_s, len(plans), eta, estimate), eta, owner, "race",
                   estimate)


def create_solo(runs_root: str | Path, base: TrainConfig, plan: str, budget_s: float) -> list[RunDir]:
    """One plan given the whole budget alone, trained exactly as a race trains (the same slicing, data,
    seed and LR; its one rung is the last, so annealed by the clock): the baseline a race's winner is
    measured against (bench/race.py)."""
    budget_value(budget_s)
    estimate = estimate_race(base, (plan,))
    return _create(runs_root, base, (plan,), check_budget(budget_s, 1, ETA, estimate), ETA, None, "solo", estimate)


def _create(runs_root: str | Path, base: TrainConfig, plans: tuple[str, ...], budget_s: float, eta: int,
            owner: int | None, kind: str, estimate: RaceEstimate | None = None) -> list[RunDir]:
    stages = backbone_stages(base.model)
    group = f"{kind}-{secrets.token_hex(3)}"
    spec = {"budget_s": budget_s, "eta": eta, "plans": list(plans),
            "estimate": estimate.to_dict() if estimate is not None else None}
    configs = [replace(base, plan=named_plan(name, stages).to_dict(), group=group, label=LABELS[name],
                       schedule="constant", epochs=1, patience=None) for name in plans]
    runs = []
    for order, (name, config) in enumerate(zip(plans, configs)):
        runs.append(create_run(runs_root, {**config.to_dict(), "order": order, "race": {**spec, "plan": name}},
                               run_id=new_run_id(f"{group}-{name}"), owner=owner))
    return runs


def is_race(run: RunDir) -> bool:
    return isinstance(run.config_or_empty().get("race"), dict)


def race_runs(runs_root: str | Path, group: str) -> list[RunDir]:
    """The runs of a race, in plan order."""
    runs = [r for r in list_runs(runs_root) if r.config_or_empty().get("group") == group and is_race(r)]
    return sorted(runs, key=lambda r: o if isinstance(o := r.config_or_empty().get("order", 0), int) else 0)


def list_races(runs_root: str | Path) -> list[str]:
    """Race groups, newest first."""
    seen: list[str] = []
    for run in list_runs(runs_root):
        group = run.config_or_empty().get("group")
        if group and group not in seen and is_race(run):
            seen.append(group)
    return seen


def race_spec(runs: list[RunDir]) -> dict[str, Any]:
    spec = runs[0].config_or_empty().get("race") if runs else None
    if not isinstance(spec, dict):
        raise EngineError("These runs are not a race.")
    return spec


def leaderboard(runs: list[RunDir]) -> list[dict[str, Any]]:
    """One row per plan, best place first: how far it got, its accuracy, its time, and in words why it
    ended where it did (a cancelled or refused plan's reason belongs beside it, not in a log). A plan
    that finished no slice has no place and is never the winner."""
    rows = []
    for run in runs:
        status = _race_status(run)
        race = status.get("race") if isinstance(status.get("race"), dict) else {}
        metrics = run.metrics()
        last = metrics[-1] if metrics else {}
        state = run.status()
        rows.append({
            "place": race.get("place") if metrics else None,
            "strategy": run.config_or_empty().get("label"),
            "winner": bool(race.get("winner")) and bool(metrics),
            "rungs": race.get("rungs", 0),
            "out_after_rung": race.get("out_after"),
            "val_acc": last.get("val_acc"),
            "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
            "val_loss": last.get("val_loss"),
            "epochs": len(metrics),
            "images": sum(round(m.get("images_per_s", 0) * m.get("epoch_s", 0)) for m in metrics),
            "train_s": race.get("train_s"),
            "state": state.state,
            "reason": state.reason,
            "run_id": run.run_id,
        })
    return sorted(rows, key=lambda row: (row["place"] is None, row["place"] or 0,
                                         -(row["val_acc"] or 0.0)))


def _race_status(run: RunDir) -> dict[str, Any]:
    status = read_json(run.status_path, {})
    return status if isinstance(status, dict) else {}


def race_record(runs: list[RunDir]) -> dict[str, Any]:
    """What the race as a whole recorded (in its first run's status ``race``): when it started, its
    set-up seconds (``setup_s``, once every plan is set up) and, when it named no winner, why
    (``outcome``)."""
    race = _race_status(runs[0]).get("race") if runs else None
    return race if isinstance(race, dict) else {}


def race_curves(runs: list[RunDir]) -> list[dict[str, Any]]:
    """(plan, wall-clock seconds since the race started, validation accuracy) per closed epoch."""
    rows = []
    for run in runs:
        label = run.config_or_empty().get("label") or run.run_id
        for m in run.metrics():
            rows.append({"strategy": label, "epoch": m["epoch"], "race_s": m["elapsed_s"], "val_acc": m["val_acc"],
                         "val_loss": m["val_loss"]})
    return rows


def race_winner(runs: list[RunDir]) -> RunDir | None:
    """The run the race named winner; never one without a finished slice (no epoch, no score)."""
    for run in runs:
        if _race_status(run).get("race_winner") and run.metrics():
            return run
    return None

