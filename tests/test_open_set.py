"""The open-set rule (issue 28, point 2): a run says when an image is none of its classes. The rule's
numbers on synthetic features, then a real small run (digits, feature extraction on the packaged
pretrained backbone): natural photos are flagged, its own images are not, the CLI and the Inference
page say so, ``--open-set off`` turns it off, a damaged or stale rule is never used. No mocks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.cli import main
from engine.core.files import read_json
from engine.outputs.predict import predict_files
from engine.runs.load import load_run_model
from engine.runs.open_set import OPEN_SET_FILE, OpenSetRule, knn_distance, load_open_set, run_open_set, save_open_set
from engine.runs.store import open_run
from engine.training.open_set import fit_open_set

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


# ------------------------------------------------------------------ the numbers
def test_the_distance_is_to_the_kth_nearest_training_image():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    query = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])  # the same direction as the first; opposite to it
    assert knn_distance(torch.nn.functional.normalize(bank), query, 1).tolist() == pytest.approx([0.0, 1.0])
    assert knn_distance(torch.nn.functional.normalize(bank), query, 2).tolist() == pytest.approx([0.4, 1.6])


def test_the_threshold_flags_the_stated_share_of_held_out_images():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 64, generator=gen) * 3
    labels = torch.arange(3).repeat_interleave(100)
    bank = centres[labels] + torch.randn(300, 64, generator=gen)
    held_out = centres[torch.arange(3).repeat(200)] + torch.randn(600, 64, generator=gen)
    far = torch.randn(200, 64, generator=gen) * 3  # none of the three clusters
    rule = fit_open_set(bank, labels, held_out[:300], epoch=2)
    assert rule.k == 1 and rule.epoch == 2 and rule.quantile == 0.95
    fresh = rule.unknown(rule.scores(held_out[300:])).float().mean()
    assert 0.01 <= fresh <= 0.10  # new images of the known classes: about 5%
    assert rule.unknown(rule.scores(far)).float().mean() >= 0.95
    assert fit_open_set(bank, labels, torch.zeros(0, 64)) is None  # nothing to set a threshold on


def test_a_damaged_or_foreign_rule_file_is_no_rule(tmp_path):
    from safetensors.torch import save_file

    from engine.runs.store import RunDir

    run = RunDir(tmp_path)
    good = OpenSetRule(bank=torch.nn.functional.normalize(torch.randn(5, 4)), labels=torch.tensor([0, 1, 0, 1, 1]),
                       k=1, threshold=0.3, epoch=1)
    save_open_set(run, good)
    assert load_open_set(tmp_path / OPEN_SET_FILE, num_classes=2).threshold == pytest.approx(0.3)
    assert load_open_set(tmp_path / OPEN_SET_FILE, num_classes=1) is None  # labels beyond the run's classes
    meta = {"rule": "knn-cosine", "k": "1", "threshold": "0.3", "epoch": "1"}
    for tensors, bad_meta in [({"bank": torch.full((2, 4), float("nan")), "labels": torch.tensor([0, 1])}, meta),
                              ({"bank": torch.ones(2, 4), "labels": torch.tensor([0, 1])}, {**meta, "threshold": "inf"}),
                              ({"bank": torch.ones(2, 4), "labels": torch.tensor([0, 1])}, {**meta, "k": "9"}),
                              ({"bank": torch.ones(2, 4), "labels": torch.tensor([0])}, meta),
                              ({"bank": torch.ones(2, 4), "labels": torch.tensor([0, 1])}, {**meta, "rule": "energy"})]:
        save_file(tensors, str(tmp_path / OPEN_SET_FILE), metadata=bad_meta)
        assert load_open_set(tmp_path / OPEN_SET_FILE) is None, bad_meta
    (tmp_path / OPEN_SET_FILE).write_bytes(b"\x00" * 40)
    assert load_open_set(tmp_path / OPEN_SET_FILE) is None


# ------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Digits, 30 per class at 64 px, feature extraction on the packaged ImageNet backbone: a few seconds."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    config = TrainConfig(data="digits", image_size=64, max_per_class=30, epochs=2, num_workers=0,
                         plan=FreezePlan.parse("feature-extraction").to_dict())
    run = create_run(tmp_path_factory.mktemp("open-set-runs"), config.to_dict(), run_id="20240101-000000-open")
    assert fit(config, run).status == "finished"
    return run


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    from engine.data.datasets import load_source

    out = tmp_path_factory.mktemp("digit-files")
    ds = load_source("digits")
    paths = []
    for i in range(1500, 1510):
        path = out / f"digit-{ds.class_names[ds.labels[i]]}-{i}.png"
        ds.image(i).save(path)
        paths.append(path)
    return paths


def _photos(photo_dir):
    return [photo_dir / name for name in PHOTOS]


def test_a_finished_run_has_its_rule_recorded(digits_run):
    record = read_json(digits_run.status_path)["calibration"]
    assert "error" not in record, record
    rule = run_open_set(digits_run, 10)
    assert rule is not None and record["unknown_threshold"] == pytest.approx(rule.threshold)
    assert record["open_set"]["rule"] == "knn-cosine" and record["open_set"]["k"] == 1
    assert record["open_set"]["images"] == rule.bank.shape[0] == 240  # the training split: 80% of 300
    assert digits_run.status().calibration["unknown_threshold"] == pytest.approx(rule.threshold)


def test_photos_are_unknown_to_a_digits_model_and_its_own_digits_are_not(digits_run, digit_files, photo_dir, capsys):
    assert main(["predict", *map(str, _photos(photo_dir) + digit_files), "--run", str(digits_run.path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    photos, digits = rows[:len(PHOTOS)], rows[len(PHOTOS):]
    assert all(r["unknown"] for r in photos), [(r["file"], r["unknown_score"]) for r in photos]
    assert sum(r["unknown"] for r in digits) <= 2, [(r["file"], r["unknown_score"]) for r in digits]
    for r in rows:
        assert r["unknown_score"] >= 0 and r["unknown_threshold"] == rows[0]["unknown_threshold"]
        assert r["unknown"] == (r["unknown_score"] > r["unknown_threshold"])
        assert r["topk"]  # the nearest class is still given
    assert main(["predict", str(_photos(photo_dir)[0]), "--run", str(digits_run.path)]) == 0
    out = capsys.readouterr().out
    assert "UNKNOWN: not one of the run's classes" in out and "--open-set off" in out


def test_open_set_off_gives_the_plain_prediction(digits_run, photo_dir, capsys):
    photos = _photos(photo_dir)[:2]
    assert main(["predict", *map(str, photos), "--run", str(digits_run.path), "--json", "--open-set", "off"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all("unknown" not in r for r in rows)
    with_rule = predict_files(load_run_model(digits_run.path), photos, open_set=run_open_set(digits_run))
    assert [r["topk"][0]["index"] for r in rows] == [r.topk[0].index for r in with_rule]  # the rule changes no class


def test_a_rule_of_an_earlier_best_is_not_used(digits_run, tmp_path):
    shutil.copytree(digits_run.path, tmp_path / digits_run.run_id)
    copy = open_run(tmp_path, digits_run.run_id)
    rule = run_open_set(copy)
    save_open_set(copy, OpenSetRule(bank=rule.bank, labels=rule.labels, k=1, threshold=rule.threshold,
                                    epoch=rule.epoch - 1))
    assert run_open_set(copy) is None


def test_calibrate_fits_the_rule_for_an_older_run(digits_run, tmp_path, capsys):
    shutil.copytree(digits_run.path, tmp_path / digits_run.run_id)
    old = open_run(tmp_path, digits_run.run_id)
    (old.path / OPEN_SET_FILE).unlink()
    assert run_open_set(old) is None
    assert main(["calibrate", str(old.path)]) == 0
    assert "unknown above distance" in capsys.readouterr().out
    # the same weights, split and bank: the same threshold as at the end of the run
    assert run_open_set(old).threshold == pytest.approx(run_open_set(digits_run).threshold, rel=1e-3, abs=1e-4)


def test_a_bundle_carries_the_rule(digits_run, tmp_path):
    from engine.outputs.code import script_for_run
    from engine.runs.bundle import export_bundle, import_bundle

    run = import_bundle(export_bundle(digits_run, script_for=script_for_run), tmp_path / "runs", display_name="o.zip")
    assert run_open_set(run).threshold == run_open_set(digits_run).threshold


def test_the_inference_page_says_not_one_of_the_classes(digits_run, photo_dir, digit_files, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import ROOT

    monkeypatch.setenv("WORKBENCH_RUNS", str(digits_run.path.parent))
    at = AppTest.from_file(str(ROOT / "views" / "inference.py"), default_timeout=180)
    at.session_state["selected_run"] = digits_run.run_id
    at.run()
    at.radio[0].set_value("a trained run").run()
    rule = run_open_set(digits_run)
    known = min(predict_files(load_run_model(digits_run.path), digit_files, open_set=rule),
                key=lambda r: r.unknown_score)  # the digit nearest to the training images
    uploads = [("astronaut.png", (photo_dir / "astronaut.png").read_bytes(), "image/png"),
               ("digit.png", open(known.file, "rb").read(), "image/png")]
    at.file_uploader[0].set_value(uploads).run()
    assert not at.exception
    said = [m.value for m in at.markdown if "Not one of" in m.value]
    assert len(said) == 1 and "0, 1, 2, 3, 4, 5, 6, 7" in said[0] and "and 2 more" in said[0], said
    assert any("nearest class:" in c.value for c in at.caption)
    [toggle] = [t for t in at.toggle if "none of the classes" in t.label]
    toggle.set_value(False).run()
    assert not [m.value for m in at.markdown if "Not one of" in m.value]


def test_the_onnx_export_carries_the_temperature_and_the_rule_and_predict_onnx_applies_both(
        digits_run, digit_files, photo_dir, tmp_path, capsys):
    """model.onnx computes the rule's score as its second output (the bank is inside the graph), its
    metadata holds the temperature and the rule; predict_onnx.py (onnxruntime + numpy + pillow) says
    unknown for the same images as predict --run; the INT8 file keeps both."""
    import subprocess
    import sys

    images = [str(p) for p in _photos(photo_dir)[:2] + digit_files[:3]]
    assert main(["export", str(digits_run.path), "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                 "--quantize", "int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["ok"], report["parity"]  # the logits and the score, within 1e-4
    assert main(["predict", *images, "--run", str(digits_run.path), "--json"]) == 0
    engine = json.loads(capsys.readouterr().out)
    for model in ("m.onnx", "m.int8.onnx"):
        out = subprocess.run([sys.executable, str(tmp_path / "predict_onnx.py"), *images, "--model",
                              str(tmp_path / model), "--json"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert all(r["temperature"] == pytest.approx(e["temperature"]) for r, e in zip(rows, engine))
        if model == "m.int8.onnx":  # its own threshold, set on its own scores of the validation images
            assert rows[0]["unknown"] and rows[1]["unknown"] and sum(r["unknown"] for r in rows[2:]) <= 1, rows
            assert rows[0]["unknown_threshold"] != pytest.approx(engine[0]["unknown_threshold"], abs=1e-6)
        else:
            assert [r["unknown"] for r in rows] == [r["unknown"] for r in engine], model
            assert [r["unknown_threshold"] for r in rows] == pytest.approx([e["unknown_threshold"] for e in engine])
            assert [r["unknown_score"] for r in rows] == pytest.approx([e["unknown_score"] for e in engine], abs=1e-4)
            assert [r["topk"][0]["prob"] for r in rows] == pytest.approx([e["topk"][0]["prob"] for e in engine],
                                                                          abs=1e-4)
    off = subprocess.run([sys.executable, str(tmp_path / "predict_onnx.py"), images[0], "--model",
                          str(tmp_path / "m.onnx"), "--json", "--open-set", "off"], capture_output=True, text=True,
                         timeout=120)
    assert "unknown" not in json.loads(off.stdout)[0]


def test_a_model_with_layers_after_its_head_says_the_rule_cannot_travel():
    """SqueezeNet pools after its classifier convolution: the head's input is not one step before the
    logits, so the ONNX file goes without the rule, and its metadata says why."""
    from engine.models.factory import create_model
    from engine.outputs.onnx_open_set import open_set_metadata, open_set_module

    handle = create_model("tv:squeezenet1_1", weights="none", num_classes=3, check_output=False)
    feats = 512 * 13 * 13
    rule = OpenSetRule(bank=torch.nn.functional.normalize(torch.randn(4, feats)), labels=torch.tensor([0, 1, 2, 0]),
                       k=1, threshold=0.5)
    wrapped, why = open_set_module(handle, rule, torch.randn(2, 3, 224, 224))
    assert wrapped is None and "applies layers after its head" in why
    assert open_set_metadata(rule, why) == {"exported": False, "why": why}
    tiny = create_model("timm:test_resnet", weights="none", num_classes=3, check_output=False)
    from engine.training.feature_cache import head_inputs

    x = torch.randn(2, *tiny.spec.input_size)
    with torch.inference_mode():
        bank = head_inputs(tiny.module.eval(), tiny.spec.head, x)
    rule = OpenSetRule(bank=torch.nn.functional.normalize(bank), labels=torch.tensor([0, 1]), k=1, threshold=0.5)
    wrapped, how = open_set_module(tiny, rule, x)
    with torch.inference_mode():
        logits, score = wrapped(x)
        assert torch.allclose(logits, tiny.module(x), atol=1e-5) and score.tolist() == pytest.approx([0, 0], abs=1e-5)


def test_an_oversized_rule_file_is_no_rule_and_a_bundle_refuses_it(tmp_path):
    from engine.runs.bundle import BundleLimits
    from engine.runs.open_set import MAX_FILE_BYTES

    path = tmp_path / OPEN_SET_FILE
    with open(path, "wb") as f:  # sparse: no 64 MB written
        f.truncate(MAX_FILE_BYTES + 1)
    assert load_open_set(path) is None
    assert BundleLimits().member_limit(OPEN_SET_FILE) == MAX_FILE_BYTES < BundleLimits().member_limit("best.safetensors")
