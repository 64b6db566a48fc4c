"""Cleaning the data from the evidence: decisions about single images (engine.data.overrides), the
possibly-mislabelled ranking (engine.lab.mislabeled), the CLI and the Evaluate page. Real folders of
real digits, a really trained tiny run; the image files are checked byte for byte to stay untouched."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.core.errors import DataError
from engine.data import decisions as dec
from engine.data import overrides as ov
from engine.data.datasets import load_source, validate


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return tmp_path


def _digits_folder(root: Path, per_class: int = 6, classes=(0, 1, 2), flipped: int = 0) -> Path:
    """One folder per digit of real 8x8 scikit-learn digits; ``flipped`` ones copied into class 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / str(c) / f"{j}.png")
    for j, i in enumerate(np.flatnonzero(d.target == 1)[50:50 + flipped]):
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / "0" / f"x{j}.png")
    return root


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ov.OVERRIDES_FILE}


def test_relabel_exclude_restore_undo_are_honoured_and_files_never_move(tmp_path):
    root = _digits_folder(tmp_path / "data" / "digits3")
    before = _files(root)
    dec.relabel(str(root), "0/1.png", "2")
    dec.exclude(str(root), "1/3.png")
    dec.exclude(str(root), str(root / "2" / "0.png"))  # a gallery's full path names the same image
    ds = load_source(str(root))
    counts = validate(ds).counts
    assert len(ds) == 16 and counts == {"0": 5, "1": 5, "2": 6}
    assert ds.labels[[ov.image_key(ds, i) for i in range(len(ds))].index("0/1.png")] == 2
    report = validate(ds)
    assert report.overrides == {"file": ov.OVERRIDES_FILE, "relabelled": 1, "excluded": 2, "unmatched": []}
    assert any("1 image(s) relabelled, 2 excluded by workbench-overrides.json" in w for w in report.warnings)
    assert not report.skipped, "the overrides file is never a skipped file"
    saved = json.loads((root / ov.OVERRIDES_FILE).read_text())  # readable: one decision per entry, in order
    assert [(d["action"], d["image"], d.get("label")) for d in saved["decisions"]] == [
        ("relabel", "0/1.png", "2"), ("exclude", "1/3.png", None), ("exclude", "2/0.png", None)]
    assert dec.undo(str(root)).image == "2/0.png"
    dec.restore(str(root), "0/1.png")  # the last word on an image counts
    ds = load_source(str(root))
    assert validate(ds).counts == {"0": 6, "1": 5, "2": 6}
    assert _files(root) == before, "image files are never moved, changed or deleted"
    while dec.undo(str(root)):
        pass
    assert dec.undo(str(root)) is None and len(load_source(str(root))) == 18 and not load_source(str(root)).overrides


def test_split_folders_csv_and_builtin_layouts_honour_the_decisions(tmp_path, monkeypatch):
    splits = tmp_path / "data" / "splits"
    _digits_folder(splits / "train", per_class=4, classes=(0, 1))
    _digits_folder(splits / "val", per_class=2, classes=(0, 1))
    dec.relabel(str(splits), "val/0/0.png", "1")
    dec.exclude(str(splits), "train/1/2.png")
    ds = load_source(str(splits))
    assert validate(ds).split_counts == {"train": {"0": 4, "1": 3}, "val": {"0": 1, "1": 3}}
    assert not ds.skipped, "beside train/ and val/ the overrides file is not 'a file not used'"

    flat = _digits_folder(tmp_path / "data" / "csv", per_class=3, classes=(0, 1))
    rows = ["path,label"] + [f"{c}/{j}.png,{'zero' if c == 0 else 'one'}" for c in (0, 1) for j in range(3)]
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    dec.relabel(str(flat), "0/2.png", "one")
    assert validate(load_source(str(flat))).counts == {"one": 4, "zero": 2}

    import shutil

    archive = Path(shutil.make_archive(str(tmp_path / "data" / "shapes"), "zip", flat))  # a zip: beside it
    import engine.data.datasets

    decoded = []
    real_check = engine.data.datasets.check_image
    with monkeypatch.context() as patched:  # a decision is one click: it names an image of the data without
        patched.setattr(engine.data.datasets, "check_image", lambda path: decoded.append(path) or real_check(path))
        dec.exclude(str(archive), "1/0.png")  # decoding every one (1.2 s a click on a 2,000-photo zip when it did)
    assert decoded == []
    assert (tmp_path / "data" / "shapes.zip.workbench-overrides.json").is_file()
    with pytest.raises(DataError, match=r"is not an image of shapes\.zip:"):  # not its hidden extraction folder
        dec.exclude(str(archive), "1/nope.png")
    report = validate(load_source(str(archive)))  # the relabel zipped along with the folder, then the exclusion
    assert report.counts == {"one": 3, "zero": 2} and report.overrides["relabelled"] == 1
    assert report.overrides["file"] == "workbench-overrides.json in the zip and shapes.zip.workbench-overrides.json"

    from engine.data.stamp import source_stamp

    stamp = source_stamp("digits")
    dec.exclude("digits", "digits[5]")
    assert source_stamp("digits") != stamp, "the Training page's cached data report is read again"
    assert (tmp_path / "data" / "overrides" / "digits.json").is_file()
    assert len(load_source("digits")) == 1796 and "digits[5]" not in load_source("digits").sources


def test_hostile_decisions_and_files_get_one_clear_message(tmp_path):
    root = _digits_folder(tmp_path / "data" / "d", per_class=3)
    for image, label in (("../../etc/passwd", "1"), ("/etc/passwd", "1"), ("0/nope.png", "1")):
        with pytest.raises(DataError, match="is not an image of d"):
            dec.relabel(str(root), image, label)
    with pytest.raises(DataError, match="'7' is not a class of d .*existing class"):
        dec.relabel(str(root), "0/0.png", "7")
    with pytest.raises(DataError, match="Unknown decision"):
        dec.decide(str(root), "0/0.png", "delete")
    assert not (root / ov.OVERRIDES_FILE).exists(), "a refused decision writes nothing"

    dec.exclude(str(root), "0/0.png")
    (root / "0" / "1.png").rename(root / "0" / "renamed.png")  # the user renames a file: its decision is stale
    ov.overrides_path(str(root)).write_text(json.dumps({"version": 1, "decisions": [
        {"image": "0/0.png", "action": "exclude"}, {"image": "0/1.png", "action": "exclude"},
        {"image": "1/0.png", "action": "relabel", "label": "gone"}]}))
    ds = load_source(str(root))
    assert len(ds) == 8 and len(ds.overrides["unmatched"]) == 2
    assert any("2 decision(s) match nothing and are ignored" in w for w in validate(ds).warnings)

    for text, said in (("{not json", "is not valid JSON"), ('{"decisions": [{"image": "0/0.png", "action": "rm"}]}',
                       "decision 1 has the action 'rm'"), ('[1, 2]', "is not an overrides file"),
                       ('{"version": 9, "decisions": []}', "has version 9")):
        ov.overrides_path(str(root)).write_text(text)
        with pytest.raises(DataError, match=said):
            load_source(str(root))  # training and the data report refuse rather than drop someone's decisions
        assert main(["data", "overrides", str(root)]) == 2
    from ui.overrides import writable  # the app writes decisions only inside its data folder

    assert writable(str(root)) and writable("lfw") and not writable(str(tmp_path)) and not writable("/etc")
    ov.overrides_path(str(root)).unlink()
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"decisions": []}')
    ov.overrides_path(str(root)).symlink_to(outside)
    with pytest.raises(DataError, match="is a link"):
        load_source(str(root))


def test_two_sessions_deciding_at_once_keep_every_decision(tmp_path):
    root = _digits_folder(tmp_path / "data" / "d", per_class=6)
    images = [f"{c}/{j}.png" for c in range(3) for j in range(4)]
    threads = [threading.Thread(target=dec.exclude, args=(str(root), image)) for image in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.image for d in ov.read_overrides(str(root)).decisions) == sorted(images)


def test_a_flipped_label_ranks_first_and_an_old_run_keeps_its_data(tmp_path, capsys):
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.lab.mislabeled import rank_mislabeled
    from engine.outputs.code import script_unsupported
    from engine.outputs.evaluate import evaluation_report
    from engine.runs.store import create_run
    from engine.training.loop import fit

    root = _digits_folder(tmp_path / "data" / "flips", per_class=30, classes=(0, 1), flipped=3)
    dec.exclude(str(root), "1/29.png")  # decided before training: the run trains without it
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(root), image_size=32, epochs=6,
                         batch_size=10, num_workers=0, plan=FreezePlan.full(head_lr=1e-2).to_dict())
    run = create_run(tmp_path / "runs", config.to_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two; on a busy box a second thread stalls each step
    try:
        assert fit(config, run).status == "finished"
    finally:
        torch.set_num_threads(threads)
    assert [d.image for d in ov.run_overrides(run.path).decisions] == ["1/29.png"]

    ranking = rank_mislabeled(run, top=5)
    assert ranking.images == 62 and {s.split for s in ranking.suspects} <= {"train", "val"}
    assert {s.image for s in ranking.suspects[:3]} == {"0/x0.png", "0/x1.png", "0/x2.png"}, ranking.suspects
    top = ranking.suspects[0]
    assert top.given == "0" and top.predicted == "1" and top.loss == max(s.loss for s in ranking.suspects)

    before = evaluation_report(run)
    for s in ranking.suspects[:3]:
        dec.relabel(str(root), s.image, "1")
    dec.undo(str(root))
    dec.exclude(str(root), "1/0.png")
    # the old run is evaluated on the data as it trained on it; the next training and report see the decisions
    after = evaluation_report(run)
    assert after.confusion == before.confusion and after.misclassified == before.misclassified
    assert validate(load_source(str(root))).overrides["relabelled"] == 2
    assert "decision(s) about single images" in script_unsupported(config)
    assert "decision(s) about single images" in script_unsupported(config, str(run.path))
    from engine.outputs.code import script_for_run
    from engine.runs.bundle import export_bundle, import_bundle

    moved = import_bundle(export_bundle(run, script_for=script_for_run), tmp_path / "elsewhere")
    assert ov.run_overrides(moved.path).decisions == ov.run_overrides(run.path).decisions  # travels with the run

    assert main(["data", "mislabeled", run.run_id, "--out", str(tmp_path / "runs"), "--top", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["suspects"]) == 3
    assert main(["data", "relabel", str(root), "0/x2.png", "1"]) == 0
    assert "applies to the next training" in capsys.readouterr().out
    assert main(["data", "overrides", str(root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["exclude"] == ["1/29.png", "1/0.png"] and len(shown["relabel"]) == 3
    assert main(["data", "relabel", str(root), "0/x2.png", "cat"]) == 2
    assert "not a class" in capsys.readouterr().err


def test_evaluate_page_excludes_relabels_and_undoes(tmp_path):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import ROOT, tiny_lfw_run

    tiny_lfw_run(tmp_path / "runs")
    at = AppTest.from_file(str(ROOT / "views" / "evaluate.py"), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    first = next(b for b in at.button if b.label == "Exclude")
    first.click().run()
    assert not at.exception, at.exception
    saved = json.loads((tmp_path / "data" / "overrides" / "lfw.json").read_text())["decisions"]
    assert [d["action"] for d in saved] == ["exclude"] and saved[0]["image"].startswith("lfw[")
    assert any("applies to the next training and data report" in s.value for s in at.success)
    assert any(c.value == "decided: excluded" for c in at.caption)
    next(b for b in at.button if b.label == "Undo last change").click().run()
    assert json.loads((tmp_path / "data" / "overrides" / "lfw.json").read_text())["decisions"] == []

    next(b for b in at.button if b.label == "Rank the images by loss").click().run()
    assert not at.exception, at.exception
    assert any(", loss " in str(img.proto) for img in at.get("image")), "the possibly-mislabelled gallery"
    next(b for b in at.button if b.key and b.key.startswith("ml-") and b.label == "Relabel").click().run()
    saved = json.loads((tmp_path / "data" / "overrides" / "lfw.json").read_text())["decisions"]
    assert [d["action"] for d in saved] == ["relabel"] and saved[0]["label"] in ("face", "non-face")


@pytest.mark.timeout(60)
def test_a_pipe_named_like_an_overrides_or_labels_file_is_refused_not_read(tmp_path):
    """Reading a FIFO blocks until someone writes to it: the data check, a decision and a training hung."""
    import os

    from engine.data.datasets import load_dataset

    folder = _digits_folder(tmp_path / "d", per_class=3, classes=(0, 1))
    os.mkfifo(folder / "workbench-overrides.json")
    with pytest.raises(DataError, match="not a plain file"):
        load_source(str(folder))
    with pytest.raises(DataError, match="not a plain file"):
        dec.exclude(str(folder), "0/0.png")
    flat = _digits_folder(tmp_path / "csv", per_class=3, classes=(0, 1))
    os.mkfifo(flat / "labels.csv")
    with pytest.raises(DataError, match="labels.csv is not a plain file"):
        load_dataset(flat)


def test_undo_and_the_decisions_list_need_data_the_workbench_reads(tmp_path, monkeypatch):
    """'' is the current folder and a folder without classes is nobody's dataset: their overrides file
    is never read or rewritten."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workbench-overrides.json").write_text('{"decisions": [{"image": "a/1.png", "action": "exclude"}]}')
    before = (tmp_path / "workbench-overrides.json").read_bytes()
    for source in ("", str(tmp_path), str(tmp_path / "missing")):
        with pytest.raises(DataError):
            dec.undo(source)
        with pytest.raises(DataError):
            dec.current(source)
    assert (tmp_path / "workbench-overrides.json").read_bytes() == before


def test_a_decision_keeps_the_overrides_files_permissions(tmp_path):
    """The file travels with the folder and a team reads it: a rewrite keeps its mode (mkstemp's 0600
    made it unreadable to the others), and a new one gets what open() would give it."""
    import os
    import stat

    folder = _digits_folder(tmp_path / "d", per_class=3, classes=(0, 1))
    dec.exclude(str(folder), "0/0.png")
    path = folder / "workbench-overrides.json"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    dec.undo(str(folder))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_persons_own_notes_in_the_overrides_file_survive_a_decision(tmp_path):
    """The file is meant to be read and edited by people: a 'note' beside a decision, or a top-level
    'comment', stays when the workbench writes the file again (it was dropped)."""
    folder = _digits_folder(tmp_path / "d", per_class=3, classes=(0, 1))
    dec.exclude(str(folder), "0/0.png")
    path = folder / "workbench-overrides.json"
    data = json.loads(path.read_text())
    data["comment"] = "reviewed by Ana"
    data["decisions"][0]["note"] = "thumb over the lens"
    path.write_text(json.dumps(data))
    dec.relabel(str(folder), "0/1.png", "1")
    dec.undo(str(folder))
    dec.exclude(str(folder), "1/0.png")
    data = json.loads(path.read_text())
    assert data["comment"] == "reviewed by Ana"
    assert data["decisions"][0] == {**data["decisions"][0], "image": "0/0.png", "action": "exclude",
                                    "note": "thumb over the lens"}
    assert [d["image"] for d in data["decisions"]] == ["0/0.png", "1/0.png"]
    assert set(ov.read_overrides(str(folder)).state()) == {"0/0.png", "1/0.png"}
