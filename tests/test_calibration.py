"""Calibration (issue 28, point 1): ECE and temperature scaling on synthetic numbers, then on a real
tiny run: recorded when it finishes, added to an older run by ``python -m engine calibrate``, used by
predict (the same top-1), carried through a bundle. No mocks of the engine."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.cli import main
from engine.core.errors import RunError
from engine.core.files import atomic_write_json, read_json
from engine.outputs.code import script_for_run
from engine.outputs.predict import predict_files
from engine.runs.bundle import export_bundle, import_bundle
from engine.runs.calibration import clean_calibration, run_temperature
from engine.runs.load import load_run_model
from engine.runs.open_set import OPEN_SET_FILE
from engine.runs.status import RunStatus
from engine.runs.store import open_run
from engine.training.calibration import expected_calibration_error, fit_temperature, reliability
from tests.conftest import tiny_lfw_run


def _calibrated_set(n: int = 20000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true distribution the labels are drawn from: calibrated by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen) * 2.0
    labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
    return logits, labels


# ------------------------------------------------------------------ the numbers
def test_ece_is_near_zero_when_calibrated_and_large_when_over_confident():
    logits, labels = _calibrated_set()
    assert expected_calibration_error(logits.softmax(-1), labels) < 0.02
    assert expected_calibration_error((logits * 4).softmax(-1), labels) > 0.15
    assert expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 0.0


def test_reliability_bins_count_every_image_once():
    logits, labels = _calibrated_set(n=500)
    rows = reliability(logits.softmax(-1), labels, bins=15)
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 500
    for r in rows:
        if r["count"]:
            assert r["lower"] <= r["confidence"] <= r["upper"] + 1e-6 and 0.0 <= r["accuracy"] <= 1.0


def test_fit_temperature_recovers_the_scale():
    logits, labels = _calibrated_set()
    assert fit_temperature(logits * 2, labels) == pytest.approx(2.0, rel=0.08)
    assert fit_temperature(logits * 2, labels) == fit_temperature(logits * 2, labels)  # deterministic
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.08)
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_a_validation_split_without_a_mistake_leaves_the_temperature_at_1_and_says_why():
    """All right: the NLL falls all the way to T -> 0 (the fit used to stop at the clamp, 0.05, and every
    later prediction read ~100% sure). One mistake is enough for a minimum again."""
    from engine.outputs.calibration import describe_calibration
    from engine.training.calibration import NO_ERRORS, calibration_record

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    logits = torch.randn(40, 4, generator=gen) + 3.0 * torch.nn.functional.one_hot(labels, 4)
    logits[torch.arange(40), labels] = logits.max(-1).values + 0.5  # every image right, some barely
    assert fit_temperature(logits, labels) == 1.0
    record = calibration_record(logits, labels, epoch=2)
    assert record["temperature"] == 1.0 and record["note"] == NO_ERRORS
    assert record["ece_after"] == record["ece_before"]
    assert clean_calibration(record)["note"] == NO_ERRORS  # a status reader keeps it
    assert describe_calibration(record).startswith("temperature 1: every validation image is right")
    wrong = logits.clone()
    wrong[0] = wrong[0].roll(1)  # one mistake: a temperature is fitted again, without a note
    assert fit_temperature(wrong, labels) != 1.0 and "note" not in calibration_record(wrong, labels, epoch=2)


def test_a_record_from_elsewhere_is_checked():
    good = {"temperature": 1.5, "ece_before": 0.2, "ece_after": 0.05, "images": 10, "epoch": 1}
    assert clean_calibration(good)["temperature"] == 1.5
    for bad in ({**good, "temperature": -1.0}, {**good, "temperature": float("nan")}, {**good, "ece_after": 3.0},
                {**good, "temperature": True}, "T=2", {"ece_before": 0.1}):
        assert clean_calibration(bad) is None
    assert clean_calibration({"error": "x" * 900}) == {"error": "x" * 500}
    assert RunStatus.from_dict({"calibration": {**good, "temperature": 0.0}}).calibration is None


# ------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_lfw_run(tmp_path_factory.mktemp("cal-runs"), run_id="20240101-000000-cal")


def _older(run, root):
    """A copy of ``run`` as a run trained before calibration existed: nothing recorded."""
    shutil.copytree(run.path, root / run.run_id)
    old = open_run(root, run.run_id)
    status = read_json(old.status_path)
    status.pop("calibration", None)
    atomic_write_json(old.status_path, status)
    sidecar = old.checkpoint("best").with_suffix(".json")
    meta = read_json(sidecar)
    meta.pop("calibration", None)
    atomic_write_json(sidecar, meta)
    (old.path / OPEN_SET_FILE).unlink(missing_ok=True)
    return old


def test_a_finished_run_is_calibrated(trained):
    record = read_json(trained.status_path)["calibration"]
    assert "error" not in record, record
    assert record["temperature"] > 0 and record["ece_after"] <= record["ece_before"] + 1e-6
    assert record["bins"] == 15 and record["images"] > 0 and record["epoch"] == 1
    assert record["method"] == "temperature scaling (NLL, validation split)"
    assert read_json(trained.checkpoint("best").with_suffix(".json"))["calibration"] == record
    assert run_temperature(trained) == record["temperature"]
    print(f"tiny run: T={record['temperature']:.3f} ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}")


def test_calibrate_adds_it_to_an_older_run(trained, tmp_path, capsys):
    old = _older(trained, tmp_path)
    assert run_temperature(old) is None
    assert main(["calibrate", str(old.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    record = out["calibration"]
    assert out["run_id"] == old.run_id and record["temperature"] > 0
    assert record["ece_after"] <= record["ece_before"] + 1e-6
    assert read_json(old.status_path)["calibration"] == record
    # the same validation split and weights as at the end of the run: the same fit, up to float noise
    assert record["temperature"] == pytest.approx(read_json(trained.status_path)["calibration"]["temperature"],
                                                  rel=1e-3)
    assert main(["calibrate", old.run_id, "--out", str(tmp_path)]) == 0
    assert "ECE" in capsys.readouterr().out


def test_calibrate_refuses_a_run_without_best_weights_in_one_line(trained, tmp_path, capsys):
    old = _older(trained, tmp_path)
    old.checkpoint("best").unlink()
    assert main(["calibrate", str(old.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "best checkpoint" in err and len(err.strip().splitlines()) == 1


def test_predict_reports_the_temperature_and_keeps_the_top1(trained, tmp_path, cat_photo, coffee_photo, capsys):
    photos = [cat_photo, coffee_photo]
    handle = load_run_model(trained.path)
    plain = predict_files(handle, photos, top_k=2)
    assert main(["predict", *map(str, photos), "--run", str(trained.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    temperature = run_temperature(trained)
    for before, after in zip(plain, out):
        assert after["temperature"] == temperature
        assert after["topk"][0]["index"] == before.topk[0].index
        assert sum(t["prob"] for t in after["topk"]) == pytest.approx(1.0, abs=1e-5)  # two classes
    # without calibration the output is exactly as it was
    old = _older(trained, tmp_path)
    assert main(["predict", *map(str, photos), "--run", str(old.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [r.to_dict() for r in plain] and all("temperature" not in r for r in out)


def test_a_bundle_keeps_the_calibration(trained, tmp_path):
    data = export_bundle(trained, script_for=script_for_run)
    run = import_bundle(data, tmp_path / "runs", display_name="cal.zip")
    assert read_json(run.status_path)["calibration"] == read_json(trained.status_path)["calibration"]
    assert run_temperature(run) == run_temperature(trained)


def test_calibrate_refuses_an_active_run(trained, tmp_path):
    from engine.outputs.calibration import calibrate_run

    old = _older(trained, tmp_path)
    old.write_status(state="queued", pid=None)
    with pytest.raises(RunError, match="still queued"):
        calibrate_run(old)


def test_a_full_disk_while_calibrating_never_fails_the_run(tmp_path, monkeypatch):
    # best.json is written once by the epoch's commit, the second time by the calibration: that one fails
    monkeypatch.setenv("WORKBENCH_FAULT", "enospc:best.json:before:2")
    run = tiny_lfw_run(tmp_path, run_id="20240101-000000-full")
    monkeypatch.delenv("WORKBENCH_FAULT")
    assert run.status().state == "finished"
    assert "calibration" not in read_json(run.checkpoint("best").with_suffix(".json"))
    assert run.status().calibration["temperature"] > 0  # status.json was written before the disk filled


def test_the_inference_page_shows_the_calibrated_probabilities_and_says_so(trained, cat_photo, monkeypatch):
    """With a calibrated run the page says so once, beside the model, with the temperature it divides the
    logits by (the same predict_sources call as the CLI's, given the run's temperature)."""
    from streamlit.testing.v1 import AppTest

    from tests.conftest import ROOT

    monkeypatch.setenv("WORKBENCH_RUNS", str(trained.path.parent))
    at = AppTest.from_file(str(ROOT / "views" / "inference.py"), default_timeout=180)
    at.session_state["selected_run"] = trained.run_id
    at.run()
    at.radio[0].set_value("a trained run").run()
    assert not at.exception
    said = [c.value for c in at.caption if "calibrated" in c.value]
    assert len(said) == 1 and f"temperature {run_temperature(trained):.3g}" in said[0], said


def test_the_evaluate_page_shows_the_reliability_before_and_after_and_calibrates_an_older_run(trained, tmp_path,
                                                                                                monkeypatch):
    """A calibrated run: the reliability diagram (before and after) and calibrated confidences, said once;
    an older run: a button that calibrates it, after which the page shows the same."""
    from streamlit.testing.v1 import AppTest

    from engine.outputs.evaluate import evaluation_report
    from tests.conftest import ROOT

    report = evaluation_report(trained)
    cal, recorded = report.calibration, read_json(trained.status_path)["calibration"]
    assert cal["temperature"] == run_temperature(trained)
    images = sum(map(sum, report.confusion))
    assert sum(r["count"] for r in cal["before"]) == sum(r["count"] for r in cal["after"]) == images
    assert (cal["ece_before"], cal["ece_after"]) == pytest.approx((recorded["ece_before"], recorded["ece_after"]), abs=1e-4)
    old = _older(trained, tmp_path)
    plain = evaluation_report(old)
    assert plain.calibration is None and plain.accuracy == report.accuracy  # the same answers
    if abs(cal["temperature"] - 1) > 0.01:  # less (or more) sure, as the calibrated probabilities say
        assert sorted(plain.confidence["correct"]) != pytest.approx(sorted(report.confidence["correct"]), abs=1e-4)

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "views" / "evaluate.py"), default_timeout=180)
    at.session_state["selected_run"] = old.run_id
    at.run()
    assert not at.exception
    assert any("not calibrated" in c.value for c in at.caption)
    [button] = [b for b in at.button if b.label == "Calibrate this run"]
    button.click().run()
    assert not at.exception
    assert run_temperature(old) == pytest.approx(run_temperature(trained), rel=1e-3)
    said = [c.value for c in at.caption if "Calibrated on its validation split" in c.value]
    assert len(said) == 1 and f"{run_temperature(old):.3g}" in said[0]
    assert not [b for b in at.button if b.label == "Calibrate this run"]
