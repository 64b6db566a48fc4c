"""Data: built-in real sets, folders with junk, safe zip extraction, validation, split."""
from __future__ import annotations

import io
import zipfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import DataError
from engine.data.archive import ZipLimits, safe_extract_zip
from engine.data.datasets import (
    TransformDataset,
    digits_arrays,
    load_digits_set,
    load_folder,
    load_lfw_set,
    load_source,
    validate,
)
from engine.data.splits import stratified_split
from tests.conftest import ROOT


def _png(color=(10, 200, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _make_folder(root, spec):
    for cls, n in spec.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i}.png").write_bytes(_png((i * 20 % 255, 0, 0)))
    return root


def test_builtin_sets_are_real_and_lazy():
    digits = load_digits_set()
    assert len(digits) == 1797 and digits.class_names == [str(i) for i in range(10)]
    img = digits.image(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    lfw = load_lfw_set()
    assert len(lfw) == 200 and Counter(lfw.labels) == {0: 100, 1: 100}
    assert validate(digits).ok and validate(lfw).ok


def test_folder_skips_hidden_non_images_and_corrupt_files(tmp_path):
    root = _make_folder(tmp_path / "pets", {"cat": 3, "dog": 4})
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(_png())
    (root / "cat" / "notes.txt").write_text("hi")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "dog" / ".hidden.png").write_bytes(_png())
    ds = load_folder(root)
    assert ds.class_names == ["cat", "dog"]
    assert ds.counts() == {"cat": 3, "dog": 4}
    reasons = dict(ds.skipped)
    assert reasons["cat/notes.txt"] == "not an image file type"
    assert reasons["dog/broken.jpg"] == "not an image"  # engine.data.images.check_image's reason
    report = validate(ds)
    assert report.ok and report.warnings


def test_validation_blocks_bad_datasets(tmp_path):
    one = load_folder(_make_folder(tmp_path / "one", {"only": 5}))
    assert any("one class" in p for p in validate(one).problems)
    root = _make_folder(tmp_path / "mixed", {"a": 5, "b": 1})
    (root / "empty").mkdir()
    report = validate(load_folder(root))
    assert not report.ok
    assert any("no images: empty" in p for p in report.problems)
    assert any("fewer than 2" in p for p in report.problems)
    with pytest.raises(DataError, match="no class folders"):
        load_folder(tmp_path / "mixed" / "a")
    case = _make_folder(tmp_path / "case", {"Cat": 2, "cat": 2})
    with pytest.raises(DataError, match="only by case"):
        load_folder(case)


def test_split_is_stratified_seeded_and_disjoint():
    labels = [0] * 50 + [1] * 30 + [2] * 5
    tr, va, te = stratified_split(labels, 0.2, 0.1, seed=3)
    assert set(tr).isdisjoint(va) and set(tr).isdisjoint(te) and set(va).isdisjoint(te)
    assert sorted(tr + va + te) == list(range(len(labels)))
    val_counts = Counter(labels[i] for i in va)
    assert val_counts == {0: 10, 1: 6, 2: 1}
    assert stratified_split(labels, 0.2, 0.1, seed=3) == (tr, va, te)
    assert stratified_split(labels, 0.2, 0.1, seed=4) != (tr, va, te)
    with pytest.raises(DataError):
        stratified_split(labels, 0.0)


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_zip_of_a_folder_loads(tmp_path):
    archive = _zip(tmp_path / "flowers.zip", {
        "flowers/rose/1.png": _png(), "flowers/rose/2.png": _png(),
        "flowers/tulip/1.png": _png(), "flowers/tulip/2.png": _png(),
        "__MACOSX/flowers/._1.png": b"junk",
    })
    ds = load_source(str(archive), work_dir=tmp_path / "work")
    assert ds.class_names == ["rose", "tulip"] and len(ds) == 4


def test_a_folder_named_like_a_zip_is_a_folder_and_a_pipe_is_no_zip(tmp_path):
    import os

    folder = tmp_path / "flowers.zip"
    for cls in ("rose", "tulip"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            (folder / cls / f"{i}.png").write_bytes(_png())
    ds = load_source(str(folder))  # was "Zip file not found"
    assert ds.class_names == ["rose", "tulip"] and len(ds) == 4
    os.mkfifo(tmp_path / "pipe.zip")
    with pytest.raises(DataError, match="not a regular file"):
        load_source(str(tmp_path / "pipe.zip"))
    with pytest.raises(DataError, match="Zip file not found"):
        load_source(str(tmp_path / "missing.zip"))


def test_a_class_folder_whose_name_cannot_be_printed_is_skipped_with_the_reason(tmp_path):
    """A class name is printed (CLI lines, the app) and carried in run bundles, which refuse control
    characters: such a folder is listed as skipped, as a labels CSV's label would be."""
    for cls in ("rose", "tulip", "evil\x1b[31mred", "x" * 201):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "set" / cls / f"{i}.png").write_bytes(_png())
    ds = load_source(str(tmp_path / "set"))
    assert ds.class_names == ["rose", "tulip"] and len(ds) == 4
    reasons = dict(ds.skipped)
    assert "evil?[31mred" in reasons and "control characters" in reasons["evil?[31mred"]
    assert "x" * 201 in reasons


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png"])
def test_zip_path_escapes_are_refused(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"ok/a.png": _png(), name: _png()})
    with pytest.raises(DataError, match="outside"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "evil.png").exists()


def test_zip_size_and_count_limits_and_non_zip(tmp_path):
    archive = _zip(tmp_path / "big.zip", {f"c/{i}.png": _png() for i in range(5)})
    with pytest.raises(DataError, match="5 files"):
        safe_extract_zip(archive, tmp_path / "o1", ZipLimits(max_files=4))
    with pytest.raises(DataError, match="unpacks to"):
        safe_extract_zip(archive, tmp_path / "o2", ZipLimits(max_total_bytes=100))
    bomb = _zip(tmp_path / "bomb.zip", {"c/zeros.png": b"\0" * (20 * 1024**2)})
    with pytest.raises(DataError, match="ratio"):
        safe_extract_zip(bomb, tmp_path / "o3")
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        safe_extract_zip(fake, tmp_path / "o4")


def test_transform_dataset_decodes_lazily(default_handle):
    from engine.data.transforms import eval_transform

    ds = load_digits_set()
    calls = []
    original = ds.loaders[5]
    ds.loaders[5] = lambda: calls.append(1) or original()
    tds = TransformDataset(ds, [4, 5, 6], eval_transform(default_handle.spec, 32))
    assert calls == []
    x, y = tds[1]
    assert calls == [1] and tuple(x.shape) == (3, 32, 32) and y == ds.labels[5]


def test_cifar10_offline_is_a_clear_message(tmp_path):
    from engine.data.datasets import load_cifar10_set

    with pytest.raises(DataError, match="not in"):
        load_cifar10_set(tmp_path / "cifar", download=False)


def test_cifar10_loads_from_a_local_copy(tmp_path, monkeypatch):
    """A locally present CIFAR-10 folder (written here in its real pickle format) is used as is."""
    import hashlib
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10

    from engine.data.datasets import load_cifar10_set

    base = tmp_path / "cifar" / CIFAR10.base_folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, _md5 in CIFAR10.train_list:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (base / name).write_bytes(pickle.dumps(batch))
    for name, _md5 in CIFAR10.test_list:
        (base / name).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (base / CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))
    # torchvision checks md5 sums of the real files: point them at ours
    def md5(name):
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})
    ds = load_cifar10_set(tmp_path / "cifar", download=False)
    assert len(ds) == 20 and ds.class_names[3] == "cat"
    assert ds.image(0).size == (32, 32) and ds.image(0).mode == "RGB"


def test_user_paths_stay_inside_the_data_folder(tmp_path):
    from engine.core.errors import EngineError
    from engine.core.paths import resolve_data_path

    root = tmp_path / "data"
    (root / "flowers").mkdir(parents=True)
    assert resolve_data_path("flowers", root) == (root / "flowers").resolve()
    for bad in ("../secrets", "/etc", "flowers/../../x"):
        with pytest.raises(EngineError, match="outside the data folder"):
            resolve_data_path(bad, root)
    (root / "link").symlink_to(tmp_path)  # a link pointing out is refused too
    with pytest.raises(EngineError):
        resolve_data_path("link", root)


def test_digits_are_read_from_sklearns_file_as_load_digits_gives_them_without_importing_sklearn():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    images, target = digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    code = ("import sys; from engine.data.datasets import load_digits_set; d = load_digits_set(); d.image(0); "
            "print(len(d), 'sklearn' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["1797", "False", "False"], out.stderr[-2000:]


def test_a_folder_whose_every_image_is_unreadable_says_so_once(tmp_path):
    """Not "2 classes have no images ... Only one class has images": none has."""
    from engine.data.datasets import load_dataset, validate

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    problems = validate(load_dataset(tmp_path)).problems
    assert "No class has images: a classifier needs images of at least two classes." in problems
    assert not any("Only one class" in p for p in problems)
