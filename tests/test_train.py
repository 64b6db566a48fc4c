"""Training on real (tiny) data with real tiny models: cache, resume, early stop, runs, lock."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.config import TrainConfig
from engine.core.errors import EngineError, RunError
from engine.freeze.plan import FreezePlan
from engine.outputs.predict import predict_images
from engine.runs.background import request_cancel, start_background, wait_for
from engine.runs.checkpoint_file import load_weights, save_weights
from engine.runs.load import load_run_model
from engine.runs.locks import DeviceLock
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.policies import lr_factor
from tests.conftest import ROOT

TINY = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
            max_per_class=12, num_workers=0)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def test_feature_cache_matches_the_plain_path_and_is_used():
    plan = FreezePlan.feature_extraction(head_lr=5e-2).to_dict()
    cached = fit(tiny(plan=plan, epochs=3, feature_cache="on"))
    plain = fit(tiny(plan=plan, epochs=3, feature_cache="off"))
    assert cached.feature_cache and not plain.feature_cache
    for a, b in zip(cached.history, plain.history):
        for key in ("train_loss", "val_loss", "val_acc", "train_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert cached.history[-1]["train_loss"] < cached.history[0]["train_loss"]


def test_feature_cache_refused_when_backbone_trains():
    with pytest.raises(EngineError, match="feature cache"):
        fit(tiny(plan=FreezePlan.full().to_dict(), feature_cache="on"))


def test_full_fine_tune_learns_and_run_dir_is_complete(tmp_path):
    config = tiny(epochs=2, plan=FreezePlan.full(head_lr=3e-3).to_dict())
    run = create_run(tmp_path, config.to_dict())
    events = []
    result = fit(config, run, emit=events.append)
    assert result.status == "finished" and result.epochs_done == 2
    names = {p.name for p in run.path.iterdir()}
    assert {"config.json", "metrics.jsonl", "events.jsonl", "status.json", "best.safetensors", "best.json",
            "last.safetensors", "last.json", "last_state.pt"} <= names
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(set(m["lr"]) and m["images_per_s"] > 0 and m["epoch_s"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    status = run.status()
    assert status.state == "finished" and status.best_epoch == result.best_epoch
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished" and "StepLogged" in kinds
    meta = json.loads((run.path / "best.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["spec"]["input_size"] == [3, 32, 32]
    # the best checkpoint predicts with its own class names
    handle = load_run_model(run.path)
    from engine.data.datasets import load_digits_set

    top = predict_images(handle, [load_digits_set().image(0)], top_k=3)[0]
    assert top[0].label in handle.spec.class_names and handle.spec.num_classes == 10


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    config = tiny(epochs=2, plan=FreezePlan.last(1, head_lr=3e-3).to_dict())
    straight = fit(config, create_run(tmp_path / "a", config.to_dict()))
    run = create_run(tmp_path / "b", config.to_dict())
    # once epoch 1 is recorded, stop at the next batch (as a cancel would)
    first = fit(config, run, should_stop=lambda: bool(run.metrics()))
    assert first.status == "cancelled" and first.epochs_done == 1
    assert run.status().state == "cancelled"
    resumed = fit(config, run, resume=True)
    assert resumed.status == "finished"
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    for a, b in zip(straight.history, run.metrics()):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_a_resume_the_run_cannot_take_is_refused_and_leaves_it_as_it_was(tmp_path):
    """Fewer epochs than done, a damaged commit, data whose classes changed (renamed: the labels would
    be silently permuted; added: a size mismatch deep in load_state_dict): one clear refusal, and the
    run's config and state untouched."""
    from engine.training.run import check_resumable
    from tests.test_overrides import _digits_folder

    folder = _digits_folder(tmp_path / "digits", per_class=6, classes=(0, 1, 2))
    config = tiny(data=str(folder), epochs=2, max_per_class=None)
    run = create_run(tmp_path / "runs", config.to_dict())
    assert fit(config, run).status == "finished"
    untouched = (run.config_path.read_bytes(), run.status_path.read_bytes())
    with pytest.raises(EngineError, match="has trained 2 epoch"):
        check_resumable(run, 2)
    (folder / "2").rename(folder / "two")
    with pytest.raises(RunError, match=r"predicts other classes \(0, 1, 2\).*cannot be resumed"):
        check_resumable(run, 4)
    assert (run.config_path.read_bytes(), run.status_path.read_bytes()) == untouched
    with pytest.raises(RunError, match="cannot be resumed"):  # the engine's own check, past the CLI's
        fit(TrainConfig.from_dict({**run.config(), "epochs": 4}), run, resume=True)
    (folder / "two").rename(folder / "2")
    good = run.train_state_path.read_bytes()
    run.train_state_path.write_bytes(good[:100])
    with pytest.raises(RunError, match="damaged"):
        check_resumable(run, 4)
    run.train_state_path.write_bytes(good)
    check_resumable(run, 4)  # as it was: resumable


def test_resume_after_gradual_unfreeze_rebuilds_groups(tmp_path):
    plan = FreezePlan.feature_extraction(head_lr=3e-3, unfreeze_schedule=((1, 2),))
    config = tiny(epochs=3, plan=plan.to_dict(), feature_cache="off")
    straight = fit(config, create_run(tmp_path / "a", config.to_dict()))
    run = create_run(tmp_path / "b", config.to_dict())
    fit(config, run, should_stop=lambda: len(run.metrics()) >= 2)
    fit(config, run, resume=True)
    got = run.metrics()
    assert [m["epoch"] for m in got] == [1, 2, 3]
    assert got[-1]["val_loss"] == pytest.approx(straight.history[-1]["val_loss"], rel=1e-5)
    assert "layer4/decay" in got[-1]["lr"] and "layer4/decay" not in got[0]["lr"]


def test_early_stopping_stops():
    config = tiny(epochs=6, patience=1, monitor="val_loss", min_delta=1.0,
                  plan=FreezePlan.feature_extraction(head_lr=1e-3).to_dict())
    result = fit(config)
    assert result.status == "finished" and "early stopped" in result.reason
    assert result.epochs_done == 2 and result.best_epoch == 1


def test_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(EngineError, match="one class"):
        fit(tiny(data=str(tmp_path)))


def test_lr_schedule_warms_up_and_decays():
    values = [lr_factor(s, 100, "cosine", 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] < 0.05 and all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_factor(50, 100, "constant", 0.1) == 1.0


_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from engine.runs.checkpoint_file import save_weights
path = __import__('pathlib').Path(sys.argv[1])
i = 0
while True:
    i += 1
    save_weights(path, {{'w': torch.full((512, 1024), float(i))}}, {{'i': i}})
"""


def test_killed_writer_never_leaves_a_corrupt_checkpoint(tmp_path):
    target = tmp_path / "best.safetensors"
    save_weights(target, {"w": torch.zeros(512, 1024)}, {"i": 0})
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(root=str(ROOT)))
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, str(script), str(target)])
        time.sleep(delay + 1.5)  # import time + some writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w = load_weights(target)["w"]
        assert w.shape == (512, 1024) and torch.all(w == w[0, 0])
        meta = json.loads(target.with_suffix(".json").read_text())
        assert isinstance(meta["i"], int)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 4  # at most the writes the kills interrupted; targets always whole


def test_device_lock_is_exclusive_and_freed_when_holder_dies(tmp_path):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r});"
            f"from engine.runs.locks import DeviceLock; l = DeviceLock({str(tmp_path)!r}, 'cpu'); l.acquire();"
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match="Another training"):
        DeviceLock(tmp_path, "cpu").acquire()
    proc.kill()  # a crash: no clean release
    proc.wait()
    with DeviceLock(tmp_path, "cpu"):
        pass


def test_background_run_finishes_and_can_be_cancelled(tmp_path):
    config = tiny(epochs=1)
    run = create_run(tmp_path, config.to_dict())
    start_background(run, tmp_path)
    status = wait_for(run, timeout_s=240)
    assert status.state == "finished", (status, run.log_path.read_text()[-2000:])
    assert run.metrics() and run.checkpoint("best").is_file()

    long_run = create_run(tmp_path, tiny(epochs=50, max_per_class=40).to_dict())
    pid = start_background(long_run, tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not long_run.status().progress:
        time.sleep(0.2)
    # a background training yields the CPU to the app: every one of its threads runs 10 nicer
    import os
    from pathlib import Path

    want = min(19, os.nice(0) + 10)
    tasks = list(Path(f"/proc/{pid}/task").glob("*")) if Path("/proc").is_dir() else []
    nices = {int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in tasks if (t / "stat").exists()}
    assert nices == ({want} if tasks else set()), nices
    request_cancel(long_run)
    status = wait_for(long_run, timeout_s=120)
    assert status.state == "cancelled"
    assert len(long_run.metrics()) < 50


def test_interrupted_run_is_detected(tmp_path):
    run = create_run(tmp_path, tiny().to_dict())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run.write_status(state="running", pid=proc.pid)
    assert run.status().state == "interrupted"
