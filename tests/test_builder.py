"""The dataset builder: a folder built image by image, checked like a zip, trainable at once."""
from __future__ import annotations

import io
import threading
import zipfile

import pytest
from PIL import Image

from engine.cli import main
from engine.core.errors import DataError
from engine.data.builder import BuilderLimits, BuiltDataset, built_datasets
from engine.data.datasets import load_source, validate
from engine.data.stamp import source_stamp
from tests.test_app import by_label, isolated_dirs, page  # noqa: F401 - the fixture


def _digit_pngs(digit: int, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """Real handwritten digits (scikit-learn) as 32 px PNG files, as a user would upload them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    picked = [i for i, t in enumerate(d.target) if t == digit][start:start + n]
    out = []
    for i in picked:
        img = Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).resize((32, 32))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append((f"digit{digit}_{i}.png", buf.getvalue()))
    return out


def _strip_png() -> bytes:
    """The hostile 10000x1 PNG: 1 byte per pixel row, refused from its header (aspect), never decoded."""
    buf = io.BytesIO()
    Image.new("L", (10000, 1)).save(buf, "PNG")
    return buf.getvalue()


def test_building_checks_every_file_and_the_result_trains(tmp_path, cat_photo):
    ds = BuiltDataset.create("pets", tmp_path)
    ds.add_class("zero")
    ds.add_class("one")
    assert built_datasets(tmp_path) == ["pets"]
    zeros, ones = _digit_pngs(0, 6), _digit_pngs(1, 6)
    good = ds.add_images("zero", zeros)
    assert len(good.added) == 6 and not good.refused
    again = ds.add_images("zero", zeros[:2])  # a rerun or a double click keeps one copy
    assert again.already == [n for n, _ in zeros[:2]] and not again.added
    mixed = ds.add_images("one", [*ones, ("notes.txt", b"hello"), ("broken.png", ones[0][1][:60]),
                                  ("strip.png", _strip_png()), ("zero-again.png", zeros[3][1]), ("empty.png", b"")])
    assert len(mixed.added) == 6
    reasons = dict(mixed.refused)
    assert set(reasons) == {"notes.txt", "broken.png", "strip.png", "zero-again.png", "empty.png"}
    assert "already in class 'zero'" in reasons["zero-again.png"]  # one photo cannot carry two labels
    assert "aspect" in reasons["strip.png"] or "20:1" in reasons["strip.png"]
    on_disk = ds.classes()
    assert {k: len(v) for k, v in on_disk.items()} == {"one": 6, "zero": 6}  # refused files never written
    assert all(f.endswith(".png") for f in on_disk["one"])
    ds.add_images("one", [("looks-like.png", cat_photo.read_bytes()[:0] or _jpeg(cat_photo))])
    assert any(f.endswith(".jpg") for f in ds.classes()["one"])  # stored as what the bytes are

    data = load_source(str(ds.root))  # what training reads: the hidden marker is not an image or a skip
    report = validate(data)
    assert report.ok and report.counts == {"one": 7, "zero": 6} and not report.skipped

    before = source_stamp(str(ds.root))
    ds.remove_image("one", ds.classes()["one"][0])
    assert source_stamp(str(ds.root)) != before  # the page's cached overview is read again
    ds.rename_class("one", "ones")
    assert sorted(ds.classes()) == ["ones", "zero"]
    with zipfile.ZipFile(io.BytesIO(ds.zip_bytes())) as zf:  # what a hosted user keeps: one folder per class
        names = zf.namelist()
    assert len(names) == 12 and all(n.startswith(("pets/ones/", "pets/zero/")) for n in names)
    assert ds.delete_class("ones") == 6
    assert list(ds.classes()) == ["zero"] and not any(p.name.startswith(".deleting") for p in ds.root.iterdir())


def _jpeg(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["", " ", "..", ".hidden", "a/b", "a\\b", "train", "VAL", "x" * 65, "tab\tname"])
def test_class_names_that_cannot_be_folders_are_refused(tmp_path, name):
    ds = BuiltDataset.create("d", tmp_path)
    with pytest.raises(DataError):
        ds.add_class(name)
    assert ds.classes() == {}


def test_folders_the_builder_did_not_make_are_never_changed(tmp_path):
    (tmp_path / "mine" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="not made with the dataset builder"):
        BuiltDataset.open("mine", tmp_path)
    with pytest.raises(DataError, match="already exists"):
        BuiltDataset.create("MINE", tmp_path)
    for name in ("uploads", "../escape", "/etc"):
        with pytest.raises(DataError):
            BuiltDataset.create(name, tmp_path)
    ds = BuiltDataset.create("d", tmp_path)
    ds.add_class("a")
    ds.add_class("b")
    with pytest.raises(DataError, match="already a class"):
        ds.add_class("A")
    with pytest.raises(DataError, match="already a class"):
        ds.rename_class("a", "B")
    for cls, file in (("a", "../../mine/cats"), ("../mine", "x.png"), ("a", ".workbench-dataset.json")):
        with pytest.raises(DataError):
            ds.remove_image(cls, file)
    assert (tmp_path / "mine" / "cats").is_dir()


def test_limits_and_two_writers(tmp_path):
    ds = BuiltDataset.create("d", tmp_path)
    ds.add_class("a")
    small = BuiltDataset(ds.root, BuilderLimits(max_file_bytes=200, max_images=3))
    files = _digit_pngs(2, 5)
    result = small.add_images("a", files)
    assert len(result.added) == 0 or all(len(b) <= 200 for n, b in files if n in result.added)
    assert len(ds.classes()["a"]) <= 3 and all("over the" in why or "full" in why for _, why in result.refused)
    ds2 = BuiltDataset.create("e", tmp_path)
    ds2.add_class("a")
    batch = _digit_pngs(3, 8)
    threads = [threading.Thread(target=ds2.add_images, args=("a", batch)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ds2.classes()["a"]) == 8  # three sessions adding the same files: one copy each


def test_cli_builds_the_same_folders(tmp_path, capsys, cat_photo, coffee_photo):
    root = ["--root", str(tmp_path)]
    assert main(["dataset", "create", "kit", *root]) == 0
    assert main(["dataset", "add", "kit", "cat", str(cat_photo), *root]) == 0
    assert main(["dataset", "add", "kit", "cup", str(coffee_photo), str(tmp_path / "kit"), *root]) == 0
    assert main(["dataset", "add", "kit", "train", str(coffee_photo), *root]) == 2
    assert main(["dataset", "show", "kit", "--json", *root]) == 0
    out, err = capsys.readouterr()
    assert "'train' cannot be a class name" in err
    assert '"cup"' in out and '"cat"' in out and "Traceback" not in err
    assert main(["dataset", "delete", "kit", *root]) == 2  # the class is missing: said, nothing deleted
    assert sorted(BuiltDataset.open("kit", tmp_path).classes()) == ["cat", "cup"]


def test_training_page_builds_a_dataset_that_is_trainable_at_once(isolated_dirs, cat_photo):
    at = page("training.py")
    at.run()
    by_label(at.radio, "Data").set_value("build a dataset here").run()
    by_label(at.text_input, "New dataset name").set_value("digits-mine")
    by_label(at.button, "Create dataset").click().run()
    assert not at.exception and by_label(at.selectbox, "Dataset").value == "digits-mine"
    for cls in ("zero", "one"):
        by_label(at.text_input, "Add a class").set_value(cls)
        by_label(at.button, "Add class").click().run()
    assert not at.exception
    assert any("**zero** · 0 images" in m.value for m in at.markdown)
    by_label(at.file_uploader, "Add images to zero").set_value(
        [(n, b, "image/png") for n, b in _digit_pngs(0, 5)] + [("bad.png", b"not a png", "image/png")])
    at.run()
    assert not at.exception
    assert any("zero: 5 added, 1 refused" in s.value for s in at.success)
    assert any("bad.png" in e.value for e in at.error)
    by_label(at.file_uploader, "Add images to one").set_value([(n, b, "image/png") for n, b in _digit_pngs(1, 5)])
    at.run()
    assert any("**zero** · 5 images" in m.value for m in at.markdown)
    assert any("10 images" in str(c.proto.spec) for c in at.get("plotly_chart"))  # the overview, read anew
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("rm-digits-mine-one-"))).click().run()
    assert any("**one** · 4 images" in m.value for m in at.markdown)
    assert any("9 images" in str(c.proto.spec) for c in at.get("plotly_chart"))
    assert not by_label(at.button, "Start training").disabled  # trainable at once
    at.toggle(key="cam-digits-mine-one").set_value(True).run()  # a camera snapshot (a JPEG from the browser)
    by_label(at.camera_input, "Snapshot for one").set_value(("image.jpg", _jpeg(cat_photo), "image/jpeg"))
    at.run()
    assert any("one: 1 added" in s.value for s in at.success)
    assert any("**one** · 5 images" in m.value for m in at.markdown)
    again = page("training.py")  # a page refresh: a new session finds the dataset on disk
    again.run()
    by_label(again.radio, "Data").set_value("build a dataset here").run()
    assert by_label(again.selectbox, "Dataset").value == "digits-mine"
    assert any("**one** · 5 images" in m.value for m in again.markdown)
