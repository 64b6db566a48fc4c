"""Hostile dataset layouts: labels CSVs that point outside, at nothing, twice, or are not CSVs at
all; split folders with classes only in test/, without val/, with two names for one split.

Every bad row is skipped with its reason (the data report lists it); a bad file is one clear message.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import TrainConfig
from engine.core.errors import DataError
from engine.data.datasets import BROKEN_LINK, FOLDER_LINK, OUTSIDE, load_dataset, load_source, validate
from engine.data.layouts import MAX_CSV_ROWS
from engine.data.splits import split_all
from engine.training.setup import prepare


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value * 40 % 255, np.uint8)).save(path)
    return path


def dataset(root: Path, n: int = 6) -> Path:
    """Images a0..a{n-1}, b0..b{n-1} under images/; the caller writes labels.csv."""
    for i in range(n):
        _png(root / "images" / f"a{i}.png", i)
        _png(root / "images" / f"b{i}.png", i + 3)
    return root


def good_rows(n: int = 6, split: bool = False) -> list[str]:
    s = ["train", "train", "val", "test"]
    return [f"images/{c}{i}.png,{c}" + (f",{s[i % 4]}" if split else "") for c in "ab" for i in range(n)]


def write_csv(root: Path, header: str, rows: list[str], name: str = "labels.csv") -> Path:
    (root / name).write_text("\n".join([header, *rows]) + "\n")
    return root


def skipped(root: Path) -> dict[str, str]:
    return dict(load_dataset(root).skipped)


# ------------------------------------------------------------------ rows: skipped with the reason

def test_absolute_paths_are_skipped(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label",
                     good_rows() + ["/etc/passwd,a", "C:\\Windows\\x.png,a", f"{tmp_path}/d/images/a0.png,b"])
    reasons = skipped(root)
    assert reasons["/etc/passwd"].endswith("absolute path (paths are relative to the CSV's folder)")
    assert "absolute path" in reasons["C:\\Windows\\x.png"] and "absolute path" in reasons[f"{tmp_path}/d/images/a0.png"]
    assert len(load_dataset(root)) == 12


def test_dot_dot_paths_are_skipped(tmp_path):
    _png(tmp_path / "secret.png")
    root = write_csv(dataset(tmp_path / "d"), "path,label",
                     good_rows() + ["../secret.png,a", "images/../../secret.png,b", "images\\..\\..\\secret.png,a"])
    reasons = skipped(root)
    for bad in ("../secret.png", "images/../../secret.png", "images\\..\\..\\secret.png"):
        assert reasons[bad].endswith("path with '..' (leaves the dataset folder)")
    assert all("secret" not in s for s in load_dataset(root).sources)


def test_links_leading_out_are_skipped_like_in_a_scanned_folder(tmp_path):
    outside = tmp_path / "outside"
    _png(outside / "x.png")
    root = dataset(tmp_path / "d")
    os.symlink(outside / "x.png", root / "images" / "out.png")  # a file link leading out
    os.symlink(outside, root / "outdir")  # a folder link leading out
    os.symlink(root / "images", root / "indir")  # a folder link inside: never followed
    os.symlink(root / "missing.png", root / "images" / "broken.png")
    os.symlink(root / "images" / "a0.png", root / "images" / "again.png")  # a file link inside: used
    write_csv(root, "path,label", good_rows() + ["images/out.png,a", "outdir/x.png,a", "indir/a1.png,b",
                                                 "images/broken.png,a", "images/again.png,b"])
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons["images/out.png"] == OUTSIDE and reasons["outdir/x.png"] == OUTSIDE
    assert reasons["indir/a1.png"] == FOLDER_LINK and reasons["images/broken.png"] == BROKEN_LINK
    assert "images/again.png" not in reasons and len(ds) == 13
    assert all(os.path.realpath(s).startswith(os.path.realpath(root)) for s in ds.sources)


def test_a_file_swapped_for_a_link_after_loading_is_not_read(tmp_path):
    from engine.core.errors import ImageError

    outside = _png(tmp_path / "outside.png")
    root = write_csv(dataset(tmp_path / "d"), "path,label", good_rows())
    ds = load_dataset(root)
    target = root / "images" / "a0.png"
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(ImageError, match="outside the dataset folder"):
        ds.image(ds.sources.index(str(target)))


def test_missing_unreadable_and_non_image_files_are_skipped_not_fatal(tmp_path):
    root = dataset(tmp_path / "d")
    (root / "images" / "notes.txt").write_text("hi")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "images" / "folder.png").mkdir()
    write_csv(root, "path,label", good_rows() + ["images/gone.png,a", "images/notes.txt,a", "images/broken.png,b",
                                                 "images/folder.png,b"])
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons["images/gone.png"] == "file not found" and reasons["images/notes.txt"] == "not an image file type"
    assert reasons["images/folder.png"] == "not a file" and reasons["images/broken.png"]
    report = validate(ds)
    assert report.ok and "4 file(s) skipped (listed below)." in report.warnings


def test_duplicate_rows_keep_the_first(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label,split", good_rows(split=True) + [
        "images/a0.png,a,train", "./images/a1.png,b,train", "images//a2.png,a,train"])
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons["images/a0.png"] == "labels.csv line 14: listed twice (first on line 2); the first line is used"
    assert reasons["images/a1.png"].endswith("listed again with another label ('b'; line 3 says 'a'); the first "
                                             "line is used")
    assert "listed again in another split (train; line 4 says val)" in reasons["images/a2.png"]
    assert len(ds) == 12 and ds.splits[ds.sources.index(str(root / "images" / "a2.png"))] == "val"


def test_rows_without_label_path_or_with_wrong_columns_are_skipped(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label", good_rows() + [
        "images/a0.png,", "images/a1.png,  ", ",a", "images/b0.png,b,extra", "", "   "])
    reasons = skipped(root)
    assert reasons["labels.csv line 16"].endswith("no path")
    assert reasons["labels.csv line 17"] == "3 columns where the header has 2"
    assert any(r.endswith("no label") for r in reasons.values())
    assert len(load_dataset(root)) == 12


def test_unknown_and_empty_split_values_are_skipped(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label,split", [
        r.replace(",test", ",Validation") for r in good_rows(split=True)[:-2]] + [
        "images/b4.png,b,holdout", "images/b5.png,b,"])
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons["images/b4.png"] == "labels.csv line 12: unknown split 'holdout' (use train, val or test)"
    assert reasons["images/b5.png"] == "labels.csv line 13: no split value (use train, val or test)"
    assert set(ds.splits) == {"train", "val"}  # 'Validation' is val


def test_a_byte_order_mark_and_windows_line_ends_are_fine(tmp_path):
    root = dataset(tmp_path / "d")
    (root / "labels.csv").write_bytes(("\ufeffPath,Label,Split\r\n" + "\r\n".join(good_rows(split=True))).encode())
    ds = load_dataset(root)
    assert len(ds) == 12 and not ds.skipped and validate(ds).ok


def test_extra_columns_are_named_as_unused(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "id,path,label", [f"{i},{r}" for i, r in enumerate(good_rows())])
    ds = load_dataset(root)
    assert len(ds) == 12 and "(columns id not used)" in validate(ds).layout_note


# ------------------------------------------------------------------ the file: one clear message

@pytest.mark.parametrize("content,message", [
    (b"", "labels.csv is empty: its first line must be the header path,label"),
    (b"\n\n  \n", "labels.csv is empty"),
    (b"path,label\n", "labels.csv has a header but no rows"),
    (b"images/a0.png,a\nimages/b0.png,b\n", "labels.csv has no header row (its first line is 'images/a0.png,a')"),
    (b"file,class\nimages/a0.png,a\n", "labels.csv has the columns 'file,class': its first line must be the header"),
    (b"path;label\nimages/a0.png;a\n", "(columns are separated by commas)"),
    (b"path,label,path\nimages/a0.png,a,x\n", "the column 'path' appears twice"),
    (b"path,label\n\xff\xfe\x00junk", "labels.csv is not UTF-8 text"),
    (b"path,label\nimages/a0.png,a\x00\n", "is not a text file"),
    (b'path,label\n"images/a0.png,a\n', "labels.csv line 2 is not valid CSV (unexpected end of data)"),
])
def test_malformed_csv_is_one_clear_message(tmp_path, content, message):
    root = dataset(tmp_path / "d")
    (root / "labels.csv").write_bytes(content)
    with pytest.raises(DataError) as info:
        load_source(str(root))
    assert message in str(info.value)
    assert str(tmp_path) not in str(info.value)  # the user's names, never a server path


def test_a_huge_csv_is_refused_before_it_is_read(tmp_path):
    root = dataset(tmp_path / "d")
    with open(root / "labels.csv", "wb") as fh:
        fh.write(b"path,label\n")
        fh.truncate(21 * 1024 * 1024)
    with pytest.raises(DataError, match=r"labels.csv is 21.0 MB; a labels file may be at most 20.0 MB"):
        load_dataset(root)


def test_too_many_rows_are_refused(tmp_path):
    root = dataset(tmp_path / "d")
    (root / "labels.csv").write_text("path,label\n" + "x.png,a\n" * (MAX_CSV_ROWS + 1))
    with pytest.raises(DataError, match="more than 200,000 rows"):
        load_dataset(root)


def test_labels_differing_only_by_case_are_refused(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label", good_rows() + ["images/x.png,A"])
    with pytest.raises(DataError, match="the labels 'a' and 'A' differ only by case"):
        load_dataset(root)


def test_a_linked_labels_file_is_refused(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("path,label\n" + "\n".join(good_rows()))
    root = dataset(tmp_path / "d")
    os.symlink(outside, root / "labels.csv")
    with pytest.raises(DataError, match="labels.csv is a link"):
        load_dataset(root)


def test_a_stray_csv_beside_class_folders_is_listed_not_used(tmp_path):
    for c in "ab":
        for i in range(3):
            _png(tmp_path / "d" / c / f"{i}.png", i)
    (tmp_path / "d" / "notes.csv").write_text("when,who\n2024,me\n")
    ds = load_dataset(tmp_path / "d")
    assert ds.class_names == ["a", "b"] and len(ds) == 6
    assert "not a labels file" in dict(ds.skipped)["notes.csv"]


def test_a_linked_stray_csv_is_never_opened(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("path,label\n" + "\n".join(good_rows()))
    for c in "ab":
        for i in range(3):
            _png(tmp_path / "d" / c / f"{i}.png", i)
    os.symlink(outside, tmp_path / "d" / "other.csv")
    ds = load_dataset(tmp_path / "d")
    assert ds.class_names == ["a", "b"] and [r for f, r in ds.skipped if f == "other.csv"] == [OUTSIDE]


def test_two_labels_files_are_refused(tmp_path):
    root = write_csv(dataset(tmp_path / "d"), "path,label", good_rows(), name="one.csv")
    write_csv(root, "path,label", good_rows(), name="two.csv")
    with pytest.raises(DataError, match=r"Several labels files \(one.csv, two.csv\)"):
        load_dataset(root)


# ------------------------------------------------------------------ split folders

def _split_tree(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    for split, classes in spec.items():
        for c, n in classes.items():
            for i in range(n):
                _png(root / split / c / f"{i}.png", i)
    return root


def test_a_class_only_in_test_is_a_problem_and_training_is_refused(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2},
                                        "test": {"a": 2, "b": 2, "zebra": 2}})
    report = validate(load_dataset(root))
    assert report.problems == ["Class(es) with images only in test, none in train: zebra; a model cannot learn a "
                               "class it never trains on."]
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(root), image_size=32, epochs=1,
                         num_workers=0)
    with pytest.raises(DataError, match="only in test, none in train: zebra"):
        prepare(config)


def test_a_class_only_in_val_is_a_problem(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "c": 2}})
    assert "only in val, none in train: c" in validate(load_dataset(root)).problems[0]


def test_train_only_without_val_uses_a_share_of_train(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"a": 5, "b": 5}})
    ds = load_dataset(root)
    report = validate(ds)
    assert report.ok and report.layout_note == ("train/ folder, no validation images: validation is a random stratified "
                                           "share of train.")
    train, val, test = split_all(ds, TrainConfig(data=str(root), val_fraction=0.2))
    assert len(val) == 2 and len(train) == 8 and test == []


def test_a_val_folder_without_images_draws_validation_from_train(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"a": 5, "b": 5}})
    (root / "val" / "a").mkdir(parents=True)
    report = validate(load_dataset(root))
    assert report.ok and "validation is a random stratified share of train" in report.layout_note


def test_val_and_valid_both_are_refused(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}, "valid": {"a": 1}})
    with pytest.raises(DataError, match="Folders val/ and valid/ both name the same split"):
        load_dataset(root)


def test_odd_things_in_split_folders_are_listed(tmp_path):
    outside = tmp_path / "outside"
    _png(outside / "x.png")
    root = _split_tree(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    _png(root / "train" / "loose.png")
    _png(root / "extra" / "a" / "0.png")
    os.symlink(outside, root / "train" / "c")  # a linked class folder
    os.symlink(outside, root / "test")  # a linked split folder: never a split
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons["train/loose.png"] == "not in a class folder of train/"
    assert reasons["train/c"] == OUTSIDE
    assert reasons["extra"] == "not a split folder (train/, val/, test/): not used"
    assert reasons["test"].startswith("a link: split folders are never links")
    (root / "README.txt").write_text("digits")
    assert dict(load_dataset(root).skipped)["README.txt"] == "not in a split folder (train/, val/, test/): not used"
    assert ds.class_names == ["a", "b"] and set(ds.splits) == {"train", "val"}


def test_case_twins_across_splits_are_refused(tmp_path):
    root = _split_tree(tmp_path / "d", {"train": {"cat": 3, "dog": 3}, "val": {"Cat": 1, "dog": 1}})
    with pytest.raises(DataError, match="'Cat' and 'cat' differ only by case"):
        load_dataset(root)
