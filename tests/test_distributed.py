"""Training on several processes (engine/training/distributed.py, launch.py): 2 gloo ranks on the CPU.

Seeds are fixed (seed 0, split seed 0): the draws are the same every time, so the comparisons are
stable; what differs between 1 and 2 processes is BatchNorm seeing each rank's half of the batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.config import TrainConfig
from engine.outputs.evaluate import evaluate_run
from engine.runs.checkpoint_file import weights_meta
from engine.runs.load import load_run_model
from engine.runs.store import RunDir
from engine.training.loop import fit
from tests.conftest import ROOT

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--data", "digits", "--image-size", "24"]


def train_cli(out: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "WORKBENCH_FAULT": fault} if fault else None
    return subprocess.run([sys.executable, "-m", "engine", "train", "--out", str(out), "--json", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=env)


def one_process(run: RunDir):
    """The same recipe in this process, in one thread as each of the 2 ranks had (the numbers do not
    depend on it; the time does: on a busy 2-core machine a 2-thread training stalls, 2.9 s vs 73 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(TrainConfig.from_dict({**run.config(), "nproc": 1}))
    finally:
        torch.set_num_threads(threads)


def test_two_processes_train_like_one(tmp_path):
    """Full fine-tune of all 1,797 digits at 24 px, 2 epochs: 2 ranks within 1.5 points of 1 process, one
    metrics line per epoch, and the single-process engine loads and scores the checkpoint the same."""
    proc = train_cli(tmp_path, *TINY, "--epochs", "2", "--strategy", "full", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    run = RunDir(Path(result["run_dir"]))
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    status = run.status()
    assert status.state == "finished" and status.device == "2 processes (gloo) on cpu", status
    assert "batch 32 per step = 2 processes x 16" in status.batches

    single = one_process(run)
    two, one = run.metrics()[-1]["val_acc"], single.history[-1]["val_acc"]
    assert abs(two - one) <= 0.015, (two, one)

    load_run_model(run.path)  # the plain model, no DDP prefixes
    scored = evaluate_run(run, kind="best", split="val")
    # validation was sharded over the ranks and summed: the one-process definition, exactly
    assert abs(scored.val_acc - result["best_val_acc"]) < 1e-6  # (evaluate_run sums in float32)
    # with rank 0's BatchNorm statistics on every rank (each rank's last step moved its own): the loss too
    best = {m["epoch"]: m for m in run.metrics()}[weights_meta(run.checkpoint("best"))["epoch"]]
    assert abs(scored.val_loss - best["val_loss"]) < 1e-5, (scored.val_loss, best["val_loss"])


def test_a_crashed_rank_fails_the_run_clearly_and_it_resumes_across_an_unfreeze(tmp_path):
    """Rank 1 killed in the first step of epoch 2: the run reads failed, naming the rank; resumed, it
    finishes on 2 processes, crossing a gradual unfreeze (the DDP wrapper is rebuilt; the ranks'
    weights are checked to agree every epoch)."""
    args = [*TINY, "--epochs", "3", "--strategy", "feature-extraction", "--unfreeze", "2:1", "--max-per-class", "15",
            "--nproc", "2"]
    # 120 training images, 16 a rank a step: 4 steps an epoch; the 5th is epoch 2's first, which rank 0
    # reaches only once epoch 1 is committed
    proc = train_cli(tmp_path, *args, fault="kill:rank1:step:5")
    assert proc.returncode == 1
    run_dir = next(p for p in tmp_path.iterdir() if (p / "config.json").is_file())
    run = RunDir(run_dir)
    status = run.status()
    assert status.state == "failed", status
    assert status.reason.startswith("rank 1 of 2 exited with signal SIGKILL"), status.reason
    assert "error: rank 1 of 2 exited" in proc.stderr
    assert [m["epoch"] for m in run.metrics()] == [1]

    proc = train_cli(tmp_path, "--resume", run.run_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run.status().state == "finished"
    rows = run.metrics()
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    assert rows[2]["trainable_params"] > rows[1]["trainable_params"]  # epoch 3 trained the top stage too


def test_feature_cache_is_computed_by_shards_and_trains_the_head_like_one_process(tmp_path):
    """Frozen backbone: each rank computes its shard of the features once; gathered in order, the
    head trains on exactly the one-process features (a linear head: the same steps up to rounding)."""
    proc = train_cli(tmp_path, *TINY, "--strategy", "feature-extraction", "--lr", "1e-2", "--max-per-class", "40",
                     "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["feature_cache"] is True
    run = RunDir(Path(result["run_dir"]))
    single = one_process(run)
    assert single.feature_cache
    two, one = run.metrics()[-1], single.history[-1]
    assert abs(two["val_loss"] - one["val_loss"]) < 1e-3, (two, one)
    images = json.loads(run.status_path.read_text())["split"]["val"]
    assert abs(two["val_acc"] - one["val_acc"]) <= 1 / images + 1e-9  # at most a borderline image flips on rounding


def test_the_frozen_stages_run_once_on_two_processes_as_they_would_on_images(tmp_path):
    """Last stage on 2 ranks: each rank computes its shard of the cached inputs once and the view of the
    top trains under DDP; the same 2-process run on images gives the same numbers (BatchNorm in the
    trained stage sees each rank's half of the batch either way)."""
    args = [*TINY, "--strategy", "last-n:1", "--lr", "1e-2", "--max-per-class", "40", "--epochs", "2", "--nproc", "2"]
    results = {}
    for cache in ("auto", "off"):
        proc = train_cli(tmp_path / cache, *args, "--feature-cache", cache)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[cache] = json.loads(proc.stdout)
    assert results["auto"]["feature_cache"] is True and results["off"]["feature_cache"] is False
    cached, plain = (RunDir(Path(results[c]["run_dir"])).metrics() for c in ("auto", "off"))
    for a, b in zip(cached, plain, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-3 and abs(a["train_loss"] - b["train_loss"]) < 1e-3, (a, b)
    load_run_model(RunDir(Path(results["auto"]["run_dir"])).path)  # the plain model: no view, no DDP prefixes


def test_training_page_offers_processes_only_with_several_gpus(tmp_path, monkeypatch):
    """One process per GPU; the page passes it to the run's config (a batch that does not divide is refused
    beside the settings, nothing created). Without several GPUs the field is not there."""
    from tests.test_app import by_label, page

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = page("training.py")
    at.run()
    assert not at.exception and not [n for n in at.number_input if n.label.startswith("Processes")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    at.run()
    procs = by_label(at.number_input, "Processes (one per GPU)")
    assert procs.value == 2 and procs.max == 2
    by_label(at.number_input, "Batch size").set_value(33)
    by_label(at.button, "Start training").click().run()
    assert not at.exception and any("split evenly among the 2 processes" in e.value for e in at.error)
    assert not (tmp_path / "runs").is_dir() or not any((tmp_path / "runs").iterdir())


def test_the_failure_named_is_the_cause_not_its_consequences():
    """torchrun reports every rank that ended badly; the run's status names the one that caused it."""
    from types import SimpleNamespace

    from engine.training.launch import ENGINE_ERROR, failure_reason

    def failure(code: int, message: str, at: int = 0):
        names = {-9: "SIGKILL", -15: "SIGTERM"}
        return SimpleNamespace(exitcode=code, message=message, timestamp=at, signal_name=lambda: names[code])

    lost = "internal error (RuntimeError: Connection closed by peer; typically caused by a remote worker crashing)"
    killed = {0: failure(-15, lost, 1), 1: failure(-9, "Signal 9 (SIGKILL) received by PID 7", 2)}
    assert failure_reason(killed, 2).startswith("rank 1 of 2 exited with signal SIGKILL")
    bug = {0: failure(1, lost), 1: failure(1, "internal error (ZeroDivisionError: division by zero)")}
    assert failure_reason(bug, 2).startswith("rank 1 of 2 exited with exit code 1 after an internal error "
                                             "(ZeroDivisionError")
    refused = {1: failure(2, ENGINE_ERROR + "The data cannot be trained on: one class."), 0: failure(1, lost)}
    assert failure_reason(refused, 2) == "The data cannot be trained on: one class."
