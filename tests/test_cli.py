"""The CLI as a user runs it: a subprocess, JSON on stdout, one-line errors on stderr."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import ROOT


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )


def test_models_filter_is_fast_and_json():
    start = time.perf_counter()
    proc = run_cli("models", "--filter", "resnet", "--json")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert any(r["name"] == "tv:resnet18" and r["params"] == 11_689_512 for r in rows)
    assert elapsed < 15, f"models --filter took {elapsed:.1f}s"


def test_predict_json_on_a_real_photo_offline(cat_photo, coffee_photo):
    proc = run_cli("predict", str(cat_photo), str(coffee_photo), "--json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["file"] for r in out] == [str(cat_photo), str(coffee_photo)]
    assert out[0]["topk"][0]["index"] in {281, 282, 283, 284, 285}
    assert out[1]["topk"][0]["label"] == "espresso"
    assert set(out[0]["topk"][0]) == {"label", "index", "prob"}


def test_summary_json_has_totals_and_rows():
    proc = run_cli("summary", "tv:resnet18", "--input-size", "224", "--num-classes", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["output_shape"] == [1, 10]
    assert data["total_params"] == data["trainable_params"] == 11_181_642
    assert any(m["name"] == "layer4" and m["output_shape"] == [1, 512, 7, 7] for m in data["modules"])


def test_user_errors_are_one_line_without_traceback(tmp_path):
    proc = run_cli("summary", "resnet_nope")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Unknown model" in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    proc = run_cli("predict", str(bad), "--model", "timm:test_resnet", "--weights", "none", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not an image" in json.loads(proc.stdout)[0]["error"]
    proc = run_cli("predict", str(bad), "--model", "timm:test_resnet", "--weights", "hub")
    assert proc.returncode == 2 and "offline" in proc.stderr and "Traceback" not in proc.stderr


def test_freeze_json_reports_stages_and_frozen_bn():
    proc = run_cli("freeze", "timm:test_resnet", "--strategy", "last-n:1", "--num-classes", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = {r["name"]: r for r in data["stages"]}
    assert rows["layer4"]["trainable"] == rows["layer4"]["params"] > 0
    assert rows["layer1"]["trainable"] == 0
    assert data["trainable_params"] == rows["layer4"]["params"] + rows["head"]["params"]
    assert data["frozen_bn_count"] > 0
    proc = run_cli("freeze", "timm:test_resnet", "--strategy", "bogus")
    assert proc.returncode == 2 and "Unknown freeze strategy" in proc.stderr


def test_train_eval_predict_resume_through_the_cli(tmp_path, cat_photo):
    common = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32",
              "--max-per-class", "10", "--out", str(tmp_path), "--json"]
    proc = run_cli("train", "--data", "lfw", "--strategy", "feature-extraction", "--epochs", "2",
                   "--lr", "0.05", *common)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "finished" and summary["epochs"] == 2 and summary["feature_cache"]
    assert set(summary) >= {"run_dir", "best_val_acc", "seconds"}
    run_id = summary["run_id"]
    proc = run_cli("eval", run_id, "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["per_class_acc"]) == {"non-face", "face"}
    proc = run_cli("predict", str(cat_photo), "--run", run_id, "--out", str(tmp_path), "--json")
    assert json.loads(proc.stdout)[0]["topk"][0]["label"] in {"non-face", "face"}
    proc = run_cli("train", "--resume", run_id, "--epochs", "3", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 3
    proc = run_cli("train", "--data", str(tmp_path / "nope"), *common)
    assert proc.returncode == 2 and "Unknown data" in proc.stderr and "Traceback" not in proc.stderr


def test_json_output_is_strict_json_even_where_a_score_has_no_value(tmp_path, capsys):
    """A class with no validation images has no accuracy: null, not NaN (which strict parsers refuse)."""
    from engine.cli import main
    from engine.config import TrainConfig
    from engine.runs.store import create_run
    from engine.training.loop import fit
    from tests.test_overrides import _digits_folder

    data = tmp_path / "splits"
    _digits_folder(data / "train", per_class=6, classes=(0, 1))
    _digits_folder(data / "val", per_class=3, classes=(0,))  # no validation images of class 1
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(data), image_size=32, epochs=1,
                         num_workers=0)
    run = create_run(tmp_path / "runs", config.to_dict())
    assert fit(config, run).status == "finished"
    capsys.readouterr()
    assert main(["eval", run.run_id, "--out", str(tmp_path / "runs"), "--json"]) == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["per_class_acc"]["1"] is None and report["per_class_acc"]["0"] is not None


def test_eval_says_when_the_split_is_not_the_one_the_run_was_measured_on(tmp_path, capsys):
    """Images that became unreadable are skipped when the data is read, so the split shrinks: the
    scores are of fewer images than the run was validated on, and eval says so."""
    from engine.cli import main
    from engine.config import TrainConfig
    from engine.outputs.evaluate import evaluate_run
    from engine.runs.store import create_run
    from engine.training.loop import fit
    from tests.test_overrides import _digits_folder

    data = _digits_folder(tmp_path / "digits", per_class=10, classes=(0, 1))
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(data), image_size=32, epochs=1,
                         num_workers=0)
    run = create_run(tmp_path / "runs", config.to_dict())
    assert fit(config, run).status == "finished"
    assert evaluate_run(run).changed is None
    for png in sorted(data.rglob("*.png"))[:6]:
        png.write_bytes(b"not an image any more")
    result = evaluate_run(run)
    assert result.changed and "measured on 4 val images" in result.changed
    capsys.readouterr()
    assert main(["eval", run.run_id, "--out", str(tmp_path / "runs")]) == 0
    assert "note: the run was measured on 4 val images" in capsys.readouterr().err
