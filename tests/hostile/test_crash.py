"""kill -9 at every write point of a run, and a full disk: resume gives exactly the finished epochs.

Each case trains a tiny model for 2 epochs in a fresh process with a fault armed at one write
point (engine/faults.py), then resumes it without the fault. The resumed run must equal the
uninterrupted reference: epochs [1, 2] once each, last/best checkpoints and optimizer state from
the same epoch, weights equal to the reference's, no temp files left.

The cases run one after another: each process is forked from a server that imported torch once
(tests/hostile/_cli.py), so a case takes ~1.2 s; two at a time took 3x longer in all (two trainings'
thread pools spinning on 2 cores).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.runs.checkpoint_file import load_weights, weights_meta
from engine.runs.store import RunDir, list_runs
from tests.hostile._cli import TINY_TRAIN, engine

EPOCHS = ["--epochs", "2"]


def _train(out, fault: str | None = None):
    env = {"WORKBENCH_FAULT": fault} if fault else {}
    return engine("train", *TINY_TRAIN, *EPOCHS, "--out", str(out), "--json", env=env)


@dataclass
class Crash:
    """One case: the faulty training, the run's state (and its reason) right after it, and the resume."""

    out: Path
    faulty: object
    state: str | None
    reason: str | None
    resumed: object | None


def _crash_then_resume(out: Path, fault: str) -> Crash:
    locks = {"WORKBENCH_LOCKS": str(out.parent / f"{out.name}-locks")}  # its own device folder: no lock left by another case
    faulty = engine("train", *TINY_TRAIN, *EPOCHS, "--out", str(out), "--json",
                    env={"WORKBENCH_FAULT": fault, **locks})
    runs = list_runs(out)
    if len(runs) != 1:
        return Crash(out, faulty, None, None, None)
    status = runs[0].status()
    resumed = engine("train", "--resume", runs[0].run_id, "--out", str(out), "--json", env=locks)
    return Crash(out, faulty, status.state, status.reason, resumed)


def _crashes(tmp_path_factory, faults: dict[str, str]) -> dict[str, Crash]:
    return {case: _crash_then_resume(tmp_path_factory.mktemp(case), fault) for case, fault in faults.items()}


def _only_run(out) -> RunDir:
    runs = list_runs(out)
    assert len(runs) == 1, [r.path for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    ran = _train(out)
    assert ran.rc == 0, ran.err
    return _only_run(out)


def _assert_same_as_reference(run: RunDir, reference: RunDir) -> None:
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    lines = [line for line in run.metrics_path.read_text().splitlines() if line.strip()]
    assert len(lines) == 2  # no duplicate, no torn line left
    for got, want in zip(metrics, reference.metrics()):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4, abs=1e-6)
    state = torch.load(run.train_state_path, weights_only=True)
    assert state["epoch"] == 2 and [m["epoch"] for m in state["history"]] == [1, 2]
    assert weights_meta(run.checkpoint("last"))["epoch"] == 2
    assert json.loads(run.checkpoint("last").with_suffix(".json").read_text())["epoch"] == 2
    ref_best = weights_meta(reference.checkpoint("best"))["epoch"]
    assert weights_meta(run.checkpoint("best"))["epoch"] == ref_best == state["best_epoch"]
    got, want = load_weights(run.checkpoint("last")), load_weights(reference.checkpoint("last"))
    for name, tensor in want.items():
        assert torch.allclose(got[name].float(), tensor.float(), atol=1e-5, rtol=1e-4), name
    for name, tensor in state["model"].items():
        assert torch.equal(tensor, got[name]), name  # last.safetensors is the committed epoch's weights
    assert run.status().state == "finished"
    assert not [p.name for p in run.path.iterdir() if p.name.endswith(".tmp")]


# (file, point, nth write of that file in the killed process)
KILL_POINTS = [
    ("last_state.pt", "before", 2), ("last_state.pt", "mid", 2), ("last_state.pt", "before-rename", 2),
    ("last_state.pt", "after", 2),
    ("last.safetensors", "before", 2), ("last.safetensors", "mid", 2), ("last.safetensors", "before-rename", 2),
    ("last.safetensors", "after", 2),
    ("last.json", "mid", 2), ("last.json", "before-rename", 2),
    ("best.safetensors", "before", 1), ("best.safetensors", "mid", 1), ("best.safetensors", "before-rename", 1),
    ("best.json", "before-rename", 1),
    ("metrics.jsonl", "mid", 2), ("events.jsonl", "mid", 5),
    ("status.json", "after", 1),  # just after the run folder exists: it names its process from the start
    ("status.json", "mid", 3), ("status.json", "before-rename", 6),
    ("events.jsonl", "mid", 1),  # before the first epoch commits: the resumed run starts again
]


KILL_IDS = [f"kill-{f}-{p}-{n}" for f, p, n in KILL_POINTS]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    return _crashes(tmp_path_factory, {case: f"kill:{f}:{p}:{n}" for case, (f, p, n) in zip(KILL_IDS, KILL_POINTS)})


@pytest.mark.parametrize("case", KILL_IDS)
def test_kill_at_write_point_then_resume_is_exact(killed, reference, case):
    crash = killed[case]
    assert crash.faulty.rc == -9, (crash.faulty.rc, crash.faulty.err[-1500:])
    run = _only_run(crash.out)
    assert crash.state == "interrupted"  # not "running" forever
    assert crash.resumed.rc == 0, crash.resumed.err[-2000:]  # killed before epoch 1 committed: it starts again
    _assert_same_as_reference(run, reference)


ENOSPC_POINTS = [("last_state.pt", 2), ("last.safetensors", 2), ("best.safetensors", 1), ("metrics.jsonl", 1)]
ENOSPC_IDS = [f"disk-full-{f}-{n}" for f, n in ENOSPC_POINTS]


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    return _crashes(tmp_path_factory, {case: f"enospc:{f}:{'mid' if f.endswith('.jsonl') else 'before'}:{n}"
                                       for case, (f, n) in zip(ENOSPC_IDS, ENOSPC_POINTS)})


@pytest.mark.parametrize("case", ENOSPC_IDS)
def test_full_disk_is_a_clear_error_and_resume_works_once_freed(disk_full, reference, case):
    crash = disk_full[case]
    failed = crash.faulty
    assert "Traceback" not in failed.err
    run = _only_run(crash.out)
    assert failed.rc != 0 and crash.state == "failed", (failed.rc, crash.state, failed.err[-1500:])
    assert "space" in crash.reason and "resume" in crash.reason, crash.reason
    assert len([ln for ln in failed.err.splitlines() if ln.startswith("error:")]) == 1
    assert crash.resumed.rc == 0, crash.resumed.err[-2000:]
    _assert_same_as_reference(run, reference)


def test_stale_temp_files_are_removed_when_the_run_next_starts(tmp_path, reference):
    killed = _train(tmp_path, fault="kill:last_state.pt:before-rename:2")
    assert killed.rc == -9
    run = _only_run(tmp_path)
    leftovers = [p for p in run.path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the kill left the half-written commit behind
    assert engine("train", "--resume", run.run_id, "--out", str(tmp_path), "--json").rc == 0
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]
