"""Run records are typed: status.json and run-list rows survive a JSON round trip, and garbage."""
from __future__ import annotations

import json

import pytest

from engine.runs.status import Progress, RunStatus
from engine.runs.store import RunSummary, create_run, describe_run


def test_run_status_round_trips_through_json():
    status = RunStatus(state="running", reason="", epoch=2, epochs=5, device="cpu", pid=1234, pid_start="99",
                       heartbeat=1.5, progress=Progress(epoch=3, step=4, steps=10, eta_s=12.5, loss=0.7),
                       val_acc=0.9, best_epoch=2, best_val_acc=0.91,
                       unreadable=[{"file": "a.png", "reason": "truncated"}], created_at=1.0)
    again = RunStatus.from_dict(json.loads(json.dumps(status.to_dict())))
    assert again == status
    assert again.active and again.progress.fraction(5) == pytest.approx((2 * 10 + 4) / 50)


@pytest.mark.parametrize("garbage", [None, [], "running", 7, {"state": 3}, {"state": "exploded"},
                                     {"epoch": "two", "pid": "x", "progress": [1, 2], "unreadable": "all"},
                                     {"progress": {"epoch": "x", "nonsense": 1}}, {"pid": True}])
def test_a_garbage_status_reads_as_defaults_not_an_error(garbage):
    status = RunStatus.from_dict(garbage)
    assert status.state == "unknown"
    assert isinstance(status.epoch, int) and isinstance(status.unreadable, list)
    assert status.pid is None and not status.active


def test_fields_a_newer_version_writes_are_kept_on_disk_and_ignored_when_read(tmp_path):
    run = create_run(tmp_path, {"model": "timm:test_resnet"})
    run.write_status(state="running", epoch=1, gpu_memory_gb=3.5)
    assert json.loads(run.status_path.read_text())["gpu_memory_gb"] == 3.5
    status = run.status()
    assert status.state == "running" and status.epoch == 1 and not hasattr(status, "gpu_memory_gb")


def test_run_summary_round_trips_through_json(tmp_path):
    run = create_run(tmp_path, {"model": "timm:test_resnet", "weights": "none", "data": "/srv/secret/flowers",
                                "epochs": 3, "plan": {"strategy": "full"}})
    summary = describe_run(run)
    assert summary.data == "flowers"  # the name the user knows, not the server path
    assert RunSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary


def test_data_and_freeze_reports_round_trip_through_json(tmp_path):
    from PIL import Image

    from engine.anatomy.stages import model_stages
    from engine.data.datasets import DataReport, load_folder, validate
    from engine.freeze.plan import FreezePlan, FreezeReport, preview_plan
    from engine.models.factory import create_model

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    data = validate(load_folder(tmp_path))
    assert data.skipped and DataReport.from_dict(json.loads(json.dumps(data.to_dict()))) == data

    handle = create_model("timm:test_resnet", weights="none", num_classes=3)
    plan = FreezePlan.last(1, unfreeze_schedule=((1, 2),))
    report = preview_plan(handle.module, model_stages(handle.module, handle.spec.head), plan, epoch=1)
    again = FreezeReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.trainable_pct == report.trainable_pct


def test_wait_for_a_run_being_created_waits_for_its_status(tmp_path):
    """A run folder appears before its status.json (create_run writes config.json first): a waiter that
    saw the folder must not read that moment as a finished 'unknown' run (the browser journey did)."""
    import threading
    import time

    from engine.runs.background import wait_for
    from engine.runs.store import RunDir

    run = RunDir(tmp_path / "20990101-000000-abcd")
    run.path.mkdir()

    def create() -> None:
        time.sleep(0.4)
        run.write_status(state="queued")
        time.sleep(0.4)
        run.write_status(state="finished")

    writer = threading.Thread(target=create)
    writer.start()
    try:
        assert wait_for(run, timeout_s=10, poll_s=0.05).state == "finished"
    finally:
        writer.join()
