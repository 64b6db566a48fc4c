"""Hostile paths: nothing under a data folder is read from outside it, odd names are plain names,
and empty or wrong --data values are one clear line. Every case builds its tree here, one item each.

Links (documented in engine.data.datasets.load_folder): a link to a file that stays inside the dataset is
used; a link to a file outside, and every link to a folder (inside or outside, at any depth), is
skipped and listed with its reason. Links are never followed into loops.
"""
from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from engine.core.errors import DataError, EngineError
from engine.core.paths import resolve_data_path
from engine.data.datasets import (
    BROKEN_LINK,
    FOLDER_LINK,
    OUTSIDE,
    TransformDataset,
    load_folder,
    load_source,
    validate,
)
from tests.hostile._cli import engine


def png(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """data/pets/{cat,dog} with two good images each, and a secret folder outside the dataset."""
    root = tmp_path / "data" / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.png").write_bytes(png((i * 90, 10, 10)))
    secret = tmp_path / "secret"
    (secret / "stolen").mkdir(parents=True)
    (secret / "stolen" / "s.png").write_bytes(png((1, 1, 1)))
    (secret / "key.png").write_bytes(png((2, 2, 2)))
    return root, secret


def _no_source_outside(ds, root: Path) -> None:
    real = os.path.realpath(root)
    for src in ds.sources:
        assert os.path.realpath(src).startswith(real + os.sep), src


# ------------------------------------------------------------------ links inside a dataset
@pytest.mark.timeout(30)
def test_class_folder_linked_outside_is_skipped(tree):
    root, secret = tree
    (root / "stolen").symlink_to(secret / "stolen", target_is_directory=True)
    ds = load_folder(root)
    assert ds.class_names == ["cat", "dog"] and dict(ds.skipped)["stolen"] == OUTSIDE
    _no_source_outside(ds, root)


@pytest.mark.timeout(30)
def test_file_linked_outside_is_skipped(tree):
    root, secret = tree
    (root / "cat" / "key.png").symlink_to(secret / "key.png")
    ds = load_folder(root)
    assert dict(ds.skipped)["cat/key.png"] == OUTSIDE and ds.counts() == {"cat": 2, "dog": 2}
    _no_source_outside(ds, root)


@pytest.mark.timeout(30)
def test_deep_folder_linked_outside_is_skipped(tree):
    root, secret = tree
    deep = root / "dog" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "ok.png").write_bytes(png())
    (deep / "escape").symlink_to(secret, target_is_directory=True)
    ds = load_folder(root)
    assert dict(ds.skipped)["dog/a/b/c/escape"] == OUTSIDE
    assert ds.counts() == {"cat": 2, "dog": 3}  # the real deep file is still used
    _no_source_outside(ds, root)


@pytest.mark.timeout(30)
def test_relative_link_climbing_out_with_dotdot_is_skipped(tree):
    root, _secret = tree
    (root / "cat" / "climb.png").symlink_to(Path("..") / ".." / ".." / "secret" / "key.png")
    assert dict(load_folder(root).skipped)["cat/climb.png"] == OUTSIDE


@pytest.mark.timeout(30)
def test_link_to_a_device_is_refused(tree):
    root, _ = tree
    (root / "cat" / "zero.jpg").symlink_to("/dev/zero")
    started = time.monotonic()
    ds = load_folder(root)
    assert dict(ds.skipped)["cat/zero.jpg"] == OUTSIDE and time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_symlink_loops_end_quickly(tree):
    root, _ = tree
    (root / "cat" / "a.png").symlink_to(root / "cat" / "b.png")
    (root / "cat" / "b.png").symlink_to(root / "cat" / "a.png")  # a -> b -> a
    (root / "dog" / "self").symlink_to(root / "dog", target_is_directory=True)  # a folder containing itself
    (root / "loop").symlink_to(root, target_is_directory=True)  # the dataset inside itself
    ds = load_folder(root)
    reasons = dict(ds.skipped)
    assert reasons["cat/a.png"] == BROKEN_LINK and reasons["cat/b.png"] == BROKEN_LINK
    assert reasons["dog/self"] == FOLDER_LINK and reasons["loop"] == FOLDER_LINK
    assert ds.counts() == {"cat": 2, "dog": 2}


@pytest.mark.timeout(30)
def test_links_inside_the_dataset_files_used_folders_skipped(tree):
    root, _ = tree
    (root / "dog" / "copy.png").symlink_to(root / "cat" / "0.png")  # a file link inside: used
    (root / "dog" / "cats").symlink_to(root / "cat", target_is_directory=True)  # a folder link: skipped
    (root / "kitten").symlink_to(root / "cat", target_is_directory=True)  # a class folder link: skipped
    ds = load_folder(root)
    assert ds.class_names == ["cat", "dog"] and ds.counts() == {"cat": 2, "dog": 3}
    reasons = dict(ds.skipped)
    assert reasons["dog/cats"] == FOLDER_LINK and reasons["kitten"] == FOLDER_LINK


@pytest.mark.timeout(30)
def test_fifo_in_a_class_folder_does_not_hang(tree):
    root, _ = tree
    os.mkfifo(root / "cat" / "pipe.png")
    started = time.monotonic()
    ds = load_folder(root)
    assert dict(ds.skipped)["cat/pipe.png"] == "not a regular file" and time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_the_dataset_folder_itself_may_be_a_link(tree, tmp_path):
    """The folder a user picks may live elsewhere (a mounted disk): inside it the rules hold."""
    root, secret = tree
    (root / "cat" / "key.png").symlink_to(secret / "key.png")
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    ds = load_folder(alias)
    assert ds.counts() == {"cat": 2, "dog": 2} and dict(ds.skipped)["cat/key.png"] == OUTSIDE


@pytest.mark.timeout(30)
def test_file_swapped_for_an_outside_link_after_the_check_is_not_read(tree):
    root, secret = tree
    ds = load_folder(root)
    victim = root / "cat" / "0.png"
    victim.unlink()
    victim.symlink_to(secret / "key.png")
    i = ds.sources.index(str(victim))
    with pytest.raises(EngineError, match=f"^cat/0.png: {OUTSIDE}$"):
        ds.image(i)


# ------------------------------------------------------------------ files that change during training
@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["deleted", "truncated", "replaced-by-text"])
def test_a_file_broken_after_the_check_does_not_stop_the_epoch(tree, damage):
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    root, _ = tree
    ds = load_folder(root)
    victim = Path(ds.sources[1])
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(png()[:40])
    else:
        victim.write_text("not a picture any more")
    dataset = TransformDataset(ds, range(len(ds)), T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()]))
    assert dataset.target == 8  # decoded reduced to what the transform needs
    seen = sum(len(y) for _x, y in DataLoader(dataset, batch_size=3))
    assert seen == len(ds)  # the epoch went on: the next sample stood in
    assert [src for src, _ in dataset.failed] == [str(victim)] and dataset.substituted == {1: 2}
    assert dataset.failed[0][1].startswith("cat/1.png: ")


# ------------------------------------------------------------------ names and odd folders
@pytest.mark.timeout(30)
def test_unicode_class_and_file_names(tmp_path):
    root = tmp_path / "données"
    for cls in ("猫", "собака", "café", "emoji 🐟"):
        (root / cls).mkdir(parents=True)
        for name in ("été.png", "写真 1.png"):
            (root / cls / name).write_bytes(png())
    ds = load_folder(root)
    assert ds.class_names == sorted(["猫", "собака", "café", "emoji 🐟"]) and len(ds) == 8 and not ds.skipped
    assert ds.image(0).mode == "RGB"


@pytest.mark.timeout(30)
def test_class_folder_with_only_junk(tree):
    root, _ = tree
    junk = root / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    (junk / "fake.jpg").write_text("not a picture")
    (junk / "empty.png").write_bytes(b"")
    ds = load_folder(root)
    reasons = dict(ds.skipped)
    assert reasons == {"junk/notes.txt": "not an image file type", "junk/fake.jpg": "not an image",
                       "junk/empty.png": "empty file"}
    assert "1 class(es) have no images: junk." in validate(ds).problems


# ------------------------------------------------------------------ data paths typed by a user
@pytest.mark.parametrize("typed", ["..", "../secret", "pets/../../secret", "/etc", "/", "pets/../../../../.."])
def test_resolve_data_path_refuses_escapes(tree, typed):
    root, _ = tree
    with pytest.raises(EngineError, match="is outside the data folder; only folders inside it") as info:
        resolve_data_path(typed, root.parent)
    assert str(root.parent) not in str(info.value)  # the server's folder is not shown


def test_resolve_data_path_refuses_a_link_pointing_out(tree):
    root, secret = tree
    (root.parent / "shortcut").symlink_to(secret, target_is_directory=True)
    with pytest.raises(EngineError, match="outside the data folder"):
        resolve_data_path("shortcut", root.parent)
    assert resolve_data_path("pets", root.parent) == root.resolve()


@pytest.mark.parametrize("typed", ["", "   ", "\t\n"], ids=["empty", "spaces", "whitespace"])
def test_resolve_data_path_refuses_nothing(tree, typed):
    with pytest.raises(EngineError, match="No folder given"):
        resolve_data_path(typed, tree[0].parent)


@pytest.mark.parametrize("source", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
def test_load_source_refuses_no_data(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the current folder is never read as a dataset
    with pytest.raises(DataError, match="^No data given"):
        load_source(source)


@pytest.mark.timeout(120)
def test_cli_train_with_empty_data_is_one_line():
    ran = engine("train", "--data", "", "--model", "timm:test_resnet", "--weights", "none", timeout=100)
    ran.assert_one_line_error("data must be given")


@pytest.mark.parametrize("kind", ["a-png-file", "missing-folder", "empty-folder"])
def test_data_that_is_not_a_dataset_folder(tmp_path, kind):
    if kind == "a-png-file":
        target = tmp_path / "one.png"
        target.write_bytes(png())
        phrase = "Unknown data"
    elif kind == "missing-folder":
        target, phrase = tmp_path / "nowhere", "Unknown data"
    else:
        target, phrase = tmp_path / "empty", "has no class folders"
        target.mkdir()
    with pytest.raises(DataError, match=phrase):
        load_source(str(target))


def test_many_files_are_checked_quickly(tmp_path, cat_photo):
    """Validation is a reduced decode: 300 photo-sized JPEGs in a few seconds even on 2 shared cores."""
    buf = io.BytesIO()
    Image.open(cat_photo).convert("RGB").resize((1600, 1200)).save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    for cls in ("a", "b"):
        (tmp_path / "big" / cls).mkdir(parents=True)
        for i in range(150):
            (tmp_path / "big" / cls / f"{i}.jpg").write_bytes(data)
    started = time.monotonic()
    ds = load_folder(tmp_path / "big")
    assert len(ds) == 300 and time.monotonic() - started < 30
    shutil.rmtree(tmp_path / "big")
