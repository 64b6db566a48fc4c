"""What travels with a cluster job: one folder, uploaded by Ray as the job's ``working_dir``.

    <stage>/engine/            this engine, as it is here (the cluster runs the same code as the app)
    <stage>/job.json           the run: id, attempt, its config as the cluster reads it, resume or not
    <stage>/data/...           the dataset when it ships (a folder or a zip, with its decisions file)
    <stage>/runs/<run_id>/     the run folder as the job starts it (a resume: its last commit)

On the cluster the engine is imported from ``<stage>`` (Ray puts the working_dir on every worker's
path), so ``engine.core.paths.PROJECT_ROOT`` is the stage there: ``data/`` and ``runs/`` are where the
engine looks by default, and the job points WORKBENCH_DATA/WORKBENCH_RUNS at them explicitly.

The data either ships (a dataset on this machine within ``ship_limit()`` bytes, checked before
anything is written or submitted) or is named: a path the cluster reads (said in one line by the
job when it is not there), or an http(s) URL of a zip that the job fetches (engine/cluster/fetch.py). The built-in sets (digits, lfw) ship inside the cluster's wheels.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cluster.fetch import check_url, is_url
from engine.core.errors import EngineError
from engine.core.paths import PROJECT_ROOT
from engine.data.layouts import BUILTIN, TORCHVISION_SETS

if TYPE_CHECKING:
    from engine.runs.store import RunDir

SHIP_LIMIT_MB = 100  # default; WORKBENCH_CLUSTER_SHIP_MB changes it (Ray itself refuses a package over 500 MiB)
JOB_FILE = "job.json"
# run-folder files the job does not need to start or resume (the app keeps them; the job makes its own)
STAYS_HERE = {"status.json", "events.jsonl", "log.txt", "cancel", "metrics.jsonl"}


def ship_limit() -> int:
    try:
        return int(float(os.environ.get("WORKBENCH_CLUSTER_SHIP_MB", SHIP_LIMIT_MB)) * 1024 * 1024)
    except ValueError:
        return SHIP_LIMIT_MB * 1024 * 1024


@dataclass(frozen=True)
class DataPlan:
    """How the cluster gets the run's data. ``ships``: a local path copied into the stage as
    ``remote`` (relative to the stage); else ``remote`` is what the cluster reads as it is."""

    ships: Path | None
    remote: str
    size: int = 0

    def describe(self) -> str:
        if self.ships is None:
            return f"the cluster reads the data itself ({self.remote})"
        return f"{self.ships.name} travels with the job ({self.size / 1e6:.1f} MB)"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def plan_data(source: str, limit: int | None = None) -> DataPlan:
    """Ship or name the data, refused before anything is written when it can do neither."""
    limit = ship_limit() if limit is None else limit
    if source in BUILTIN or source in TORCHVISION_SETS:
        return DataPlan(None, source)  # in the cluster's wheels (digits, lfw), or downloaded there (cifar10)
    if is_url(source):  # fetched by the job, before it trains (engine/cluster/fetch.py)
        check_url(source)
        return DataPlan(None, source)
    path = Path(source)
    if not path.exists():
        if not path.is_absolute():
            raise EngineError(f"{source[:120]} is not on this machine; data the cluster reads itself is named by "
                              "its absolute path there.")
        return DataPlan(None, source)  # a path on the cluster: the job says in one line when it is not there
    size = _size(path)
    if size > limit:
        raise EngineError(f"{path.name} is {size / 1e6:.0f} MB, over the {limit / 1e6:.0f} MB a cluster job carries "
                          "(WORKBENCH_CLUSTER_SHIP_MB): put it where the cluster's machines read it and name that "
                          "path with --data.")
    return DataPlan(path, f"data/{path.name}", size)


def _copy_decisions(source: str, plan: DataPlan, stage: Path) -> None:
    """The dataset's decisions file (engine/data/overrides.py) where the engine looks for it on the cluster."""
    from engine.data.overrides import overrides_path

    here = overrides_path(source)
    if not here.is_file():
        return
    if plan.ships is None:
        if source in BUILTIN or source in TORCHVISION_SETS:
            there = stage / "data" / "overrides" / f"{source}.json"
        else:
            return  # data named on the cluster keeps the decisions kept beside it there
    else:
        there = overrides_path(str(stage / plan.remote))
    there.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(here, there)


def build_stage(stage: Path, run: RunDir, config: dict[str, Any], plan: DataPlan, *, attempt: int,
                resume: bool) -> dict[str, Any]:
    """Fill ``stage`` (an empty folder) with what the job needs; returns job.json's content."""
    shutil.copytree(PROJECT_ROOT / "engine", stage / "engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if plan.ships is not None:
        target = stage / plan.remote
        target.parent.mkdir(parents=True, exist_ok=True)
        if plan.ships.is_dir():
            shutil.copytree(plan.ships, target, symlinks=False,
                            ignore=shutil.ignore_patterns(".*.extracted"))
        else:
            shutil.copyfile(plan.ships, target)
    _copy_decisions(config["data"], plan, stage)
    remote = {**config, "data": plan.remote}
    weights = str(config.get("weights") or "none")
    if weights not in ("packaged", "hub", "none") and Path(weights).is_file():  # a weights file of this machine
        (stage / "weights").mkdir()
        shutil.copyfile(weights, stage / "weights" / Path(weights).name)
        remote["weights"] = f"weights/{Path(weights).name}"  # relative to the stage, resolved by the job
    folder = stage / "runs" / run.run_id
    folder.mkdir(parents=True)
    for item in run.path.iterdir():  # a resume point and the decisions the run trained with
        if item.is_file() and item.name not in STAYS_HERE and not item.name.startswith("."):
            shutil.copyfile(item, folder / item.name)
    (folder / "config.json").write_text(json.dumps(remote))
    spec = {"run_id": run.run_id, "attempt": attempt, "config": remote, "resume": resume, "nproc": remote["nproc"]}
    (stage / JOB_FILE).write_text(json.dumps(spec))
    total = _size(stage)
    if total > ship_limit() + 64 * 1024 * 1024:  # the data was checked; a resume point may add a lot
        raise EngineError(f"The job would carry {total / 1e6:.0f} MB (data, engine, resume point), over what a "
                          "cluster job carries; raise WORKBENCH_CLUSTER_SHIP_MB or name the data on the cluster.")
    return spec
