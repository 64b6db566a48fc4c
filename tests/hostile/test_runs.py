"""Damaged run folders: each is listed as damaged with its reason; every other run keeps working."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.runs.checkpoint_file import load_weights, weights_meta
from engine.runs.load import load_run_model
from engine.runs.process import process_start
from engine.runs.store import active_runs, create_run, describe_run, list_runs, open_run, usable_runs
from engine.training.loop import fit
from tests.hostile._cli import TINY_CONFIG, engine

TINY = dict(TINY_CONFIG, epochs=2)


@pytest.fixture(scope="module")
def good_run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = TrainConfig(**TINY)
    run = create_run(root, config.to_dict(), run_id="good")
    assert fit(config, run).status == "finished"
    return root


def _nan_weights(run):
    path = run.checkpoint("best")
    meta = weights_meta(path)
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_weights(path).items()}
    save_file(tensors, str(path), metadata={"workbench_meta": json.dumps(meta)})


def _foreign_weights(run):
    save_file({"not.a.layer": torch.zeros(3)}, str(run.checkpoint("best")),
              metadata={"workbench_meta": json.dumps(weights_meta(run.checkpoint("best")))})


def _no_meta_anywhere(run):
    save_file(load_weights(run.checkpoint("best")), str(run.checkpoint("best")))
    run.checkpoint("best").with_suffix(".json").unlink()


def _other_class_count(run):
    """Same parameter names (the fingerprint matches), but a head for 5 classes instead of 10."""
    path = run.checkpoint("best")
    meta = weights_meta(path)
    head = meta["spec"]["head"]
    tensors = load_weights(path)
    tensors[f"{head}.weight"] = torch.zeros(5, tensors[f"{head}.weight"].shape[1])
    tensors[f"{head}.bias"] = torch.zeros(5)
    save_file(tensors, str(path), metadata={"workbench_meta": json.dumps(meta)})


def _best_a_folder(run):
    run.checkpoint("best").unlink()
    run.checkpoint("best").mkdir()


DAMAGE = {
    "config-garbage": (lambda r: r.config_path.write_text("{not json"), "config.json"),
    "config-a-list": (lambda r: r.config_path.write_text("[1, 2]"), "config.json"),
    "config-empty-file": (lambda r: r.config_path.write_text(""), "config.json"),
    "config-epochs-text": (lambda r: r.config_path.write_text(json.dumps({**r.config(), "epochs": "many"})),
                           "epochs"),
    "config-unknown-schedule": (lambda r: r.config_path.write_text(json.dumps({**r.config(), "schedule": "warp"})),
                                "schedule"),
    "config-lr-nan": (lambda r: r.config_path.write_text(
        json.dumps({**r.config(), "plan": {**r.config()["plan"], "head_lr": float("nan")}})), "learning rate"),
    "config-unknown-model": (lambda r: r.config_path.write_text(json.dumps({**r.config(), "model": "timm:no_such_net"})),
                             "unknown model"),
    "config-plan-garbage": (lambda r: r.config_path.write_text(json.dumps({**r.config(), "plan": "all"})), "plan"),
    "best-truncated": (lambda r: r.checkpoint("best").write_bytes(r.checkpoint("best").read_bytes()[:1000]),
                       "truncated"),
    "best-garbage": (lambda r: r.checkpoint("best").write_bytes(b"\x00garbage" * 10), "truncated"),
    "best-zero-bytes": (lambda r: r.checkpoint("best").write_bytes(b""), "truncated"),
    "best-json-invalid": (lambda r: r.checkpoint("best").with_suffix(".json").write_text("{oops"), "best.json"),
    "best-all-nan": (_nan_weights, "NaN"),
    "best-no-meta": (_no_meta_anywhere, "best.json"),
    "best-missing": (lambda r: r.checkpoint("best").unlink(), "missing"),
    "best-another-models-weights": (_foreign_weights, "another model"),
    "best-head-of-another-class-count": (_other_class_count, "another model"),
    "best-a-folder": (_best_a_folder, "not a file"),
}


def _damaged_copy(root, tmp_path, name, damage):
    runs = tmp_path / "runs"
    shutil.copytree(root / "good", runs / "good")
    shutil.copytree(root / "good", runs / f"bad-{name}")
    damage(open_run(runs, f"bad-{name}"))
    return runs


@pytest.mark.parametrize("name", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_run_is_listed_with_reason_and_others_work(good_run_root, tmp_path, name):
    damage, phrase = DAMAGE[name]
    runs = _damaged_copy(good_run_root, tmp_path, name, damage)
    rows = {r["run_id"]: r for r in (describe_run(run).to_dict() for run in list_runs(runs))}
    assert rows[f"bad-{name}"]["state"] == "damaged", rows[f"bad-{name}"]
    assert phrase.lower() in rows[f"bad-{name}"]["reason"].lower(), rows[f"bad-{name}"]["reason"]
    assert rows["good"]["state"] == "finished"
    assert [r.run_id for r in usable_runs(runs)] == ["good"]  # what the Evaluate/Inference pickers offer
    assert load_run_model(runs / "good").spec.num_classes == 10
    if not name.startswith("config"):
        with pytest.raises(EngineError, match="damaged|NaN|truncated|no 'best'|another model"):
            load_run_model(runs / f"bad-{name}")


@pytest.mark.parametrize("name", ["config-garbage", "best-truncated", "best-all-nan"])
def test_cli_lists_and_refuses_a_damaged_run_in_one_line(good_run_root, tmp_path, name):
    damage, phrase = DAMAGE[name]
    runs = _damaged_copy(good_run_root, tmp_path, name, damage)
    listed = engine("runs", "--out", str(runs), "--json")
    assert listed.rc == 0, listed.err
    states = {r["run_id"]: r["state"] for r in json.loads(listed.out)}
    assert states == {"good": "finished", f"bad-{name}": "damaged"}
    engine("eval", f"bad-{name}", "--out", str(runs)).assert_one_line_error(
        "config" if name.startswith("config") else "damaged")
    ok = engine("eval", "good", "--out", str(runs), "--json")
    assert ok.rc == 0 and json.loads(ok.out)["val_images"] > 0


def test_foreign_weights_file_is_a_clear_error(good_run_root, tmp_path):
    runs = _damaged_copy(good_run_root, tmp_path, "foreign", _foreign_weights)
    with pytest.raises(EngineError, match="another model"):
        load_run_model(runs / "bad-foreign")


GARBAGE_LINES = {
    "torn-last-line": '{"epoch": 3, "val_lo',
    "binary-junk": "\x00\x01\x02 not json",
    "json-but-not-a-row": "[1, 2, 3]",
    "row-without-epoch": '{"val_acc": 0.5}',
}


@pytest.mark.parametrize("name", list(GARBAGE_LINES), ids=list(GARBAGE_LINES))
def test_garbage_metrics_line_skips_that_line_only(good_run_root, tmp_path, name):
    runs = tmp_path / "runs"
    shutil.copytree(good_run_root / "good", runs / "good")
    run = open_run(runs, "good")
    lines = run.metrics_path.read_text().splitlines()
    run.metrics_path.write_text("\n".join([lines[0], GARBAGE_LINES[name], lines[1]]) + "\n")
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert describe_run(run).state == "finished"


def test_garbage_status_reads_as_unknown_not_a_crash(good_run_root, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(good_run_root / "good", runs / "good")
    run = open_run(runs, "good")
    run.status_path.write_text("[garbage")
    assert describe_run(run).state == "unknown"
    assert load_run_model(run.path).spec.num_classes == 10


def _status(run, **fields):
    run.status_path.write_text(json.dumps(fields))


def test_a_queued_run_whose_process_never_came_is_interrupted_not_queued_forever(good_run_root, tmp_path):
    """A kill between creating the run folder and starting its process leaves 'queued' with no pid."""
    runs = tmp_path / "runs"
    shutil.copytree(good_run_root / "good", runs / "good")
    run = open_run(runs, "good")
    _status(run, state="queued", pid=None, created_at=time.time() - 3600, updated_at=time.time() - 3600)
    assert run.status().state == "interrupted" and "never started" in run.status().reason
    assert active_runs(runs) == []  # nothing blocks the Training page
    _status(run, state="queued", pid=None, updated_at=time.time())  # just queued: its process is coming
    assert run.status().state == "queued"


@pytest.mark.parametrize("pid", [1, "12x", None], ids=["unrelated-live-pid", "pid-text", "no-pid"])
def test_a_running_status_nobody_refreshes_reads_interrupted(good_run_root, tmp_path, pid):
    """'running' with a pid that is not ours (no start time, no heartbeat) and no write for long."""
    runs = tmp_path / "runs"
    shutil.copytree(good_run_root / "good", runs / "good")
    run = open_run(runs, "good")
    _status(run, state="running", pid=pid, updated_at=time.time() - 3600)
    assert run.status().state == "interrupted"
    _status(run, state="running", pid=os.getpid(), pid_start=process_start(os.getpid()), heartbeat=time.time())
    assert run.status().state == "running"
    _status(run, state="running", pid=os.getpid())  # fresh, but nothing confirms the process is its training
    assert run.status().state == "interrupted"


def test_eval_of_a_run_holding_another_tasks_checkpoint_is_one_line(good_run_root, tmp_path):
    """Another run's best checkpoint, meta and all (consistent in itself: 2 classes), copied into a
    10-class digits run: the data and the checkpoint disagree, and eval says so."""
    runs = tmp_path / "runs"
    shutil.copytree(good_run_root / "good", runs / "good")
    run = open_run(runs, "good")
    meta = weights_meta(run.checkpoint("best"))
    head = meta["spec"]["head"]
    tensors = load_weights(run.checkpoint("best"))
    tensors[f"{head}.weight"] = tensors[f"{head}.weight"][:2].clone()
    tensors[f"{head}.bias"] = tensors[f"{head}.bias"][:2].clone()
    meta = {**meta, "class_names": ["face", "non-face"], "spec": {**meta["spec"], "num_classes": 2,
                                                                  "class_names": ["face", "non-face"]}}
    save_file(tensors, str(run.checkpoint("best")), metadata={"workbench_meta": json.dumps(meta)})
    run.checkpoint("best").with_suffix(".json").write_text(json.dumps(meta))
    engine("eval", "good", "--out", str(runs)).assert_one_line_error("other classes")

