"""Compare strategies: the same data, split, budget and seed, trained one after another.

A comparison is a group of ordinary runs (config ``group`` + ``label``), so each one is listed,
resumable and evaluable like any run; one background process trains them in order.
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.data.datasets import BUILTIN_FACTS
from engine.freeze.plan import FreezePlan
from engine.lab.advisor import Advice, recommend
from engine.runs.store import RunDir, create_run, list_runs, new_run_id


def demo_plans() -> dict[str, FreezePlan]:
    """The textbook contrast: a frozen feature extractor vs fine-tuning everything."""
    return {
        "feature extraction": FreezePlan.feature_extraction(head_lr=1e-2),
        "full fine-tune": FreezePlan.default(),
    }


def demo_config() -> TrainConfig:
    """Digits at 96 px, batch 32, 2 epochs each: a few minutes on 2 CPU cores."""
    return TrainConfig(data="digits", epochs=2, batch_size=32, image_size=96)


def create_comparison(runs_root: str | Path, base: TrainConfig, plans: dict[str, FreezePlan], *,
                      owner: int | None = None) -> list[RunDir]:
    """One queued run per plan; everything but the plan is identical (data, split, seed, epochs)."""
    if len(plans) < 2:
        raise EngineError("A comparison needs at least two strategies.")
    base.check_hosted()  # a shared server's caps, before any run exists (a refusal left two runs behind)
    check_plans(base, plans)
    group = f"cmp-{secrets.token_hex(3)}"
    runs = []
    for order, (label, plan) in enumerate(plans.items()):
        config = replace(base, plan=plan.to_dict(), group=group, label=label)
        slug = "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
        runs.append(create_run(runs_root, {**config.to_dict(), "order": order},
                               run_id=new_run_id(f"{group}-{slug}"), owner=owner))
    return runs


def check_plans(base: TrainConfig, plans: dict[str, FreezePlan]) -> None:
    """What the runs would be refused for when they start, checked before any is written: the data
    (listed, not decoded: every image is checked when a run starts) and every plan against the model.
    Otherwise a bad later plan was found after the first had trained, and unknown data left runs behind."""
    from engine.training.preflight import check_startable

    check_startable(base, plans)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _label(config: dict[str, Any]) -> str | None:
    """A run's name in its comparison, when its config holds one as text."""
    return _text(config.get("label"))


def _plan(config: dict[str, Any]) -> dict[str, Any]:
    plan = config.get("plan")
    return plan if isinstance(plan, dict) else {}


def group_runs(runs_root: str | Path, group: str) -> list[RunDir]:
    runs = [r for r in list_runs(runs_root) if r.config_or_empty().get("group") == group]
    return sorted(runs, key=lambda r: o if isinstance(o := r.config_or_empty().get("order", 0), int) else 0)


def list_groups(runs_root: str | Path) -> list[str]:
    seen: list[str] = []
    for run in list_runs(runs_root):
        group = run.config_or_empty().get("group")
        if group and group not in seen:
            seen.append(group)
    return seen


def comparison_table(runs: list[RunDir]) -> list[dict[str, Any]]:
    """Final numbers per strategy: accuracy, time, trainable parameters, throughput."""
    rows = []
    for run in runs:
        config = run.config_or_empty()
        metrics = run.metrics()
        best = max((m["val_acc"] for m in metrics), default=None)
        rows.append({
            "strategy": _label(config) or _text(_plan(config).get("strategy")),
            "run_id": run.run_id,
            "state": run.status().state,
            "epochs": len(metrics),
            "best_val_acc": best,
            "final_val_acc": metrics[-1]["val_acc"] if metrics else None,
            "train_time_s": round(sum(m["epoch_s"] for m in metrics), 2),
            "wall_time_s": round(metrics[-1]["elapsed_s"], 2) if metrics else None,
            "trainable_params": metrics[-1]["trainable_params"] if metrics else None,
            "images_per_s": round(sum(m["images_per_s"] for m in metrics) / len(metrics), 1) if metrics else None,
        })
    return rows


def curves(runs: list[RunDir]) -> list[dict[str, Any]]:
    """Long-format rows (strategy, epoch, wall-clock seconds, metric values) for overlay plots."""
    rows = []
    for run in runs:
        label = _label(run.config_or_empty()) or run.run_id
        for m in run.metrics():
            rows.append({"strategy": label, "epoch": m["epoch"], "elapsed_s": m["elapsed_s"],
                         "val_acc": m["val_acc"], "val_loss": m["val_loss"], "train_loss": m["train_loss"]})
    return rows


def matrix_advice(config: dict[str, Any]) -> Advice | None:
    """The case matrix's reading of a comparison on a built-in dataset (its size and similarity are
    known); None for the user's own data, where only the advisor's measurements can tell."""
    facts = BUILTIN_FACTS.get(str(config.get("data")))
    if facts is None:
        return None
    return recommend(facts.images / facts.classes, facts.classes, facts.similarity)
