"""Dataset layouts: train/ val/ test/ folders, a labels CSV, one folder per class; zips of each; the
split a run trains, validates and tests on is exactly the one the data names."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import TrainConfig
from engine.core.files import read_json
from engine.data.archive import extract_upload
from engine.data.datasets import load_dataset, load_digits_set, load_folder, load_source, validate
from engine.data.splits import split_all, split_indices
from engine.outputs.evaluate import evaluate_run, validation_predictions
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.setup import prepare
from tests.conftest import ROOT

TINY = dict(model="timm:test_resnet", weights="none", image_size=32, batch_size=16, epochs=1, num_workers=0)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(Image.fromarray((img * 255 / 16).astype(np.uint8)), int(t)) for img, t in zip(d.images, d.target)]


DIGITS = _digits()


def _save(path: Path, image: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def split_folders(root: Path, classes=(0, 1, 2), per_split=None, names=("train", "val", "test")) -> dict:
    """Real digit PNGs in ``<split>/<class>/``; returns split -> the files written."""
    per_split = per_split or {"train": 10, "val": 4, "test": 4}
    written: dict[str, set[str]] = {s: set() for s in per_split}
    pool = [(img, t) for img, t in DIGITS if t in classes]
    k = 0
    for split, folder in zip(per_split, names):
        for c in classes:
            for j in range(per_split[split]):
                while pool[k % len(pool)][1] != c:
                    k += 1
                written[split].add(_save(root / folder / str(c) / f"{c}_{j}.png", pool[k % len(pool)][0]))
                k += 1
    return written


def csv_folder(root: Path, header="path,label,split", n=30) -> list[list[str]]:
    rows = []
    for i, (img, t) in enumerate(DIGITS[:n]):
        rel = f"images/{i}.png"
        _save(root / rel, img)
        rows.append([rel, f"d{t % 3}", ["train", "train", "train", "val", "test"][i % 5]])
    cols = header.split(",")
    (root / "labels.csv").write_text(header + "\n" + "".join(",".join(r[:len(cols)]) + "\n" for r in rows))
    return rows


def cfg(data, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(data), **kw})


# ------------------------------------------------------------------ detection and the report

def test_one_folder_per_class_is_unchanged(tmp_path):
    for c in (0, 1):
        for j, (img, _) in enumerate([d for d in DIGITS if d[1] == c][:5]):
            _save(tmp_path / "pets" / f"c{c}" / f"{j}.png", img)
    ds = load_source(str(tmp_path / "pets"))
    report = validate(ds)
    assert ds.splits is None and ds.class_names == ["c0", "c1"] and report.ok
    assert report.layout_note == "one folder per class: a random stratified split." and report.split_counts == {}
    assert load_folder(tmp_path / "pets").labels == ds.labels
    assert validate(load_digits_set()).layout_note == "built-in dataset digits: a random stratified split."


def test_train_val_test_folders_give_the_split(tmp_path):
    written = split_folders(tmp_path / "d")
    ds = load_source(str(tmp_path / "d"))
    report = validate(ds)
    assert report.ok, report.problems
    assert report.layout_note.startswith("train/, val/ and test/ folders: the given split is used; test is held out")
    assert report.split_counts == {"train": {"0": 10, "1": 10, "2": 10}, "val": {"0": 4, "1": 4, "2": 4},
                                   "test": {"0": 4, "1": 4, "2": 4}}
    train, val, test = split_all(ds, cfg(tmp_path / "d"))
    assert {ds.sources[i] for i in train} == written["train"]
    assert {ds.sources[i] for i in val} == written["val"]
    assert {ds.sources[i] for i in test} == written["test"]
    assert split_indices(ds, cfg(tmp_path / "d")) == (train, val)


@pytest.mark.parametrize("names", [("Train", "valid", "TEST"), ("train", "validation", "test")])
def test_split_folder_names_are_recognised(tmp_path, names):
    written = split_folders(tmp_path / "d", names=names)
    ds = load_dataset(tmp_path / "d")
    _, val, _ = split_all(ds, cfg(tmp_path / "d"))
    assert {ds.sources[i] for i in val} == written["val"]
    assert f"{names[1]}/" in validate(ds).layout_note


def test_max_per_class_applies_to_each_given_split(tmp_path):
    written = split_folders(tmp_path / "d")
    ds = load_dataset(tmp_path / "d")
    train, val, test = split_all(ds, cfg(tmp_path / "d", max_per_class=3))
    for part, files in ((train, "train"), (val, "val"), (test, "test")):
        assert len(part) == 9 and {ds.sources[i] for i in part} <= written[files]
        assert sorted(np.bincount([ds.labels[i] for i in part]).tolist()) == [3, 3, 3]
    assert split_all(ds, cfg(tmp_path / "d", max_per_class=3)) == (train, val, test)  # seeded: the same again


def test_train_and_test_without_val_draw_validation_from_train(tmp_path):
    written = split_folders(tmp_path / "d", per_split={"train": 10, "test": 3}, names=("train", "test"))
    ds = load_dataset(tmp_path / "d")
    report = validate(ds)
    assert report.ok and "no validation images: validation is a random stratified share of train" in report.layout_note
    train, val, test = split_all(ds, cfg(tmp_path / "d", val_fraction=0.2, test_fraction=0.3))
    assert {ds.sources[i] for i in train + val} == written["train"] and len(val) == 6
    assert {ds.sources[i] for i in test} == written["test"]  # the given test, never a share of train


def test_a_class_folder_named_train_is_still_a_class(tmp_path):
    for name in ("train", "bus"):
        for j, (img, _) in enumerate(DIGITS[:4]):
            _save(tmp_path / "vehicles" / name / f"{j}.png", img)
    ds = load_dataset(tmp_path / "vehicles")
    assert ds.class_names == ["bus", "train"] and ds.splits is None


def test_class_missing_from_val_is_a_warning(tmp_path):
    split_folders(tmp_path / "d", per_split={"train": 5, "val": 2})
    for f in (tmp_path / "d" / "val" / "2").iterdir():
        f.unlink()
    (tmp_path / "d" / "val" / "2").rmdir()
    report = validate(load_dataset(tmp_path / "d"))
    assert report.ok
    assert "No val images for: 2; its val scores leave this class out." in report.warnings


def test_labels_csv_with_a_split_column(tmp_path):
    rows = csv_folder(tmp_path / "c")
    ds = load_source(str(tmp_path / "c"))
    report = validate(ds)
    assert report.ok and report.layout_note.startswith("labels.csv beside the images with a split column: the given split")
    assert ds.class_names == ["d0", "d1", "d2"] and len(ds) == 30
    train, val, test = split_all(ds, cfg(tmp_path / "c"))
    by_split = {s: {str(tmp_path / "c" / r[0]) for r in rows if r[2] == s} for s in ("train", "val", "test")}
    assert ({ds.sources[i] for i in train}, {ds.sources[i] for i in val}, {ds.sources[i] for i in test}) == \
        (by_split["train"], by_split["val"], by_split["test"])
    label_of = {str(tmp_path / "c" / r[0]): r[1] for r in rows}
    assert all(ds.class_names[y] == label_of[s] for y, s in zip(ds.labels, ds.sources))


def test_labels_csv_without_split_is_a_random_split(tmp_path):
    csv_folder(tmp_path / "c", header="path,label")
    ds = load_source(str(tmp_path / "c"))
    assert ds.splits is None
    assert validate(ds).layout_note == "labels.csv beside the images, no split column: a random stratified split."


def test_zips_of_both_layouts_go_through_the_upload_path(tmp_path):
    written = split_folders(tmp_path / "tvt")
    csv_folder(tmp_path / "flat")
    for name, folder, top in (("tvt.zip", tmp_path / "tvt", "mydata/"), ("flat.zip", tmp_path / "flat", "")):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, top + f.relative_to(folder).as_posix())
    ds = load_source(str(tmp_path / "tvt.zip"), work_dir=tmp_path / "run")
    assert validate(ds).split_counts["val"] == {"0": 4, "1": 4, "2": 4}
    _, val, _ = split_all(ds, cfg("x"))
    assert {Path(ds.sources[i]).relative_to(Path(ds.sources[0]).parents[2]).as_posix() for i in val} == \
        {Path(f).relative_to(tmp_path / "tvt").as_posix() for f in written["val"]}
    flat = load_source(str(extract_upload(tmp_path / "flat.zip", display_name="flat.zip")))
    assert validate(flat).ok and flat.splits is not None and len(flat) == 30


# ------------------------------------------------------------------ a real run on train/ val/ test/

def test_a_run_trains_validates_and_tests_on_exactly_the_folders(tmp_path):
    written = split_folders(tmp_path / "d")
    config = cfg(tmp_path / "d")
    prep = prepare(config)
    assert {prep.train_ds.ds.sources[i] for i in prep.train_ds.indices} == written["train"]
    assert {prep.val_ds.ds.sources[i] for i in prep.val_ds.indices} == written["val"]
    assert {prep.test_ds.ds.sources[i] for i in prep.test_ds.indices} == written["test"]

    run = create_run(tmp_path / "runs", config.to_dict())
    result = fit(config, run)
    assert result.status == "finished" and "held-out images (best checkpoint, epoch 1)" in result.reason
    status = read_json(run.status_path)
    assert status["split"] == {"layout": prep.layout_note, "train": 30, "val": 12, "test": 12}
    test = status["test"]
    assert test["images"] == 12 and test["checkpoint"] == "best" and 0 <= test["acc"] <= 1

    preds = validation_predictions(run)  # evaluation sees exactly the val/ folder
    assert set(preds["sources"]) == written["val"]
    assert set(validation_predictions(run, split="test")["sources"]) == written["test"]
    summary = evaluate_run(run, split="test")
    assert summary.test_images == 12 and summary.test_acc == pytest.approx(test["acc"], abs=1e-6)
    assert summary.test_loss == pytest.approx(test["loss"], rel=1e-4, abs=1e-5)
    assert summary.val_acc is None and "val_acc" not in summary.to_dict()
    assert evaluate_run(run).val_acc == pytest.approx(result.best_val_acc, abs=1e-6)

    proc = subprocess.run([sys.executable, "-m", "engine", "eval", run.run_id, "--split", "test", "--json",
                           "--out", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["test_acc"] == pytest.approx(test["acc"], abs=1e-6)

    # the standalone script reads class folders: it would train on "train"/"val"/"test" as classes, so
    # it is refused with the reason, and a bundle's reproduce.py says so instead of training
    script = subprocess.run([sys.executable, "-m", "engine", "export", run.run_id, "--out", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert script.returncode == 2 and "laid out otherwise" in script.stderr and "Traceback" not in script.stderr
    from engine.outputs.code import script_for_run
    from engine.runs.bundle import export_bundle, import_bundle

    other = import_bundle(export_bundle(run, script_for=script_for_run), tmp_path / "other", display_name="b.zip")
    reproduce = subprocess.run([sys.executable, str(other.path / "reproduce.py")], capture_output=True, text=True,
                               timeout=60)
    assert reproduce.returncode == 1 and "laid out otherwise" in reproduce.stderr


def test_a_run_without_a_test_split_records_none(tmp_path):
    split_folders(tmp_path / "d", per_split={"train": 6, "val": 3})
    config = cfg(tmp_path / "d")
    run = create_run(tmp_path / "runs", config.to_dict())
    result = fit(config, run)
    assert result.reason == "completed" and read_json(run.status_path).get("test") is None
    with pytest.raises(Exception, match="has no test split"):
        evaluate_run(run, split="test")


def test_training_page_reports_the_layout_and_the_given_split(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    split_folders(tmp_path / "data" / "digits3", per_split={"train": 4, "val": 2, "test": 1})
    at = AppTest.from_file(str(ROOT / "views" / "training.py"), default_timeout=180)
    at.session_state["active_model"], at.session_state["active_weights"] = "timm:test_resnet", "none"
    at.session_state["active_num_classes"] = None
    at.run()
    next(r for r in at.radio if r.label == "Data").set_value("folder in the data directory").run()
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "Layout: train/, val/ and test/ folders: the given split is used; test is held out" in captions
    table = at.dataframe[0].value
    assert list(table.columns) == ["class", "train", "val", "test"] and table["val"].tolist() == [2, 2, 2]
    assert not next(b for b in at.button if b.label == "Start training").disabled


def test_the_test_split_is_evaluated_with_a_feature_cache_and_without_a_run_folder(tmp_path):
    from engine.freeze.plan import FreezePlan

    split_folders(tmp_path / "d", per_split={"train": 6, "val": 3, "test": 3})
    plan = FreezePlan.feature_extraction(head_lr=5e-2).to_dict()
    result = fit(cfg(tmp_path / "d", plan=plan, feature_cache="on", epochs=2))
    assert result.feature_cache and result.status == "finished"
    assert "on 9 held-out images (last checkpoint)" in result.reason


def test_csv_labels_that_cannot_be_printed_are_skipped_and_accents_are_one_class(tmp_path):
    """Class names are printed (predict, eval, the mislabelled ranking) and carried by run bundles,
    whose import refuses escapes, newlines and names over 200 characters: such rows are skipped with
    the reason, so a run this workbench trains is one it can import. 'café' typed precomposed or with a
    combining accent is one class."""
    import csv as csv_module

    rows = csv_folder(tmp_path, header="path,label", n=12)
    labels = ["caf\u00e9", "cafe\u0301", "\x1b[31mred", "a\nb", "x" * 201, "plain"] * 2
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(["path", "label"])
        for row, label in zip(rows, labels):
            writer.writerow([row[0], label])
    ds = load_dataset(tmp_path, verify=False)
    assert ds.class_names == ["café", "plain"] and ds.counts() == {"café": 4, "plain": 2}
    assert sum("control characters" in why for _f, why in ds.skipped) == 6
