"""The one list of datasets every page picks from (engine.data.library), the preflight a start passes
before anything is written (engine.training.preflight), and the estimates shown before long work
(engine.runs.estimate)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import Image

from engine.core.errors import DataError, EngineError
from engine.data.builder import BuiltDataset
from engine.data.library import dataset_label, list_datasets, resolve_dataset, zip_display_name


def _images(folder: Path, classes=("red", "blue"), n: int = 4) -> None:
    for c, colour in zip(classes, ((200, 0, 0), (0, 0, 200), (0, 200, 0))):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (16, 16), colour).save(folder / c / f"{i}.png")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("WORKBENCH_DATA", str(root))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    return root


def test_every_kind_of_dataset_is_listed_under_one_ref(data_dir):
    _images(data_dir / "shapes")
    built = BuiltDataset.create("plants", data_dir)
    built.add_class("leaf")
    (data_dir / ".hidden").mkdir()
    (data_dir / "overrides").mkdir()  # the data folder's own
    zips = data_dir / "uploads" / "datasets"
    zips.mkdir(parents=True)
    with zipfile.ZipFile(zips / "0123456789ab_flowers.zip", "w") as zf:
        for c in ("rose", "tulip"):
            for i in range(3):
                path = data_dir / f"{c}{i}.png"
                Image.new("RGB", (16, 16), (i * 40, 90, 10)).save(path)
                zf.write(path, f"flowers/{c}/{i}.png")
                path.unlink()
    entries = {e.ref: e for e in list_datasets()}
    assert list(entries)[:2] == ["digits", "lfw"]
    assert {"built:plants", "folder:shapes", "zip:0123456789ab_flowers.zip"} == set(entries) - {"digits", "lfw"}
    assert entries["zip:0123456789ab_flowers.zip"].label == "flowers.zip (uploaded zip)"
    assert entries["built:plants"].label == "plants (built here)"
    # each resolves to what load_source reads, inside the data folder; a zip is extracted once, beside it
    assert resolve_dataset("digits") == "digits"
    assert Path(resolve_dataset("folder:shapes")) == (data_dir / "shapes").resolve()
    unpacked = Path(resolve_dataset("zip:0123456789ab_flowers.zip"))
    assert sorted(p.name for p in unpacked.iterdir() if p.is_dir()) == ["rose", "tulip"]
    assert unpacked.resolve().is_relative_to(data_dir.resolve())


@pytest.mark.parametrize("ref", ["folder:../etc", "folder:/etc", "built:..", "zip:../../x.zip", "folder:", "nope",
                                 "folder:a/b", "zip:.hidden.zip", "folder:\0x", "cifar10"])
def test_a_ref_from_a_url_never_leaves_the_data_folder(data_dir, ref):
    with pytest.raises(EngineError) as caught:
        resolve_dataset(ref)
    assert "/etc" not in str(caught.value) or "not a dataset" in str(caught.value)


def test_a_dataset_that_is_gone_says_so(data_dir):
    with pytest.raises(DataError, match="no longer in the data folder"):
        resolve_dataset("folder:gone")
    with pytest.raises(DataError, match="upload it again"):
        resolve_dataset("zip:0123456789ab_gone.zip")
    assert dataset_label("zip:0123456789ab_gone.zip") == "gone.zip (uploaded zip)"
    assert zip_display_name("plain.zip") == "plain.zip"


def test_preflight_refuses_what_would_fail_in_the_background_and_writes_nothing(data_dir):
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.training.preflight import check_startable

    _images(data_dir / "shapes", n=4)
    base = dict(model="timm:test_resnet", weights="none", data=str(data_dir / "shapes"), image_size=32)
    check_startable(TrainConfig(**base))  # 4 per class: 3 train, 1 validation each
    with pytest.raises(DataError, match="No validation images"):
        check_startable(TrainConfig(**base, max_per_class=1))
    with pytest.raises(EngineError, match="last-n|stages"):
        check_startable(TrainConfig(**base, plan=FreezePlan.last(99).to_dict()))
    (data_dir / "one").mkdir()
    _images(data_dir / "one", classes=("only",))
    with pytest.raises(DataError):
        check_startable(TrainConfig(**{**base, "data": str(data_dir / "one")}))
    assert not (data_dir.parent / "runs").exists()


def test_an_estimate_comes_from_a_run_of_the_same_model_size_and_plan(data_dir):
    from engine.core.paths import runs_root
    from engine.runs.estimate import format_duration, measured_speed
    from tests.conftest import tiny_lfw_run

    assert measured_speed(runs_root(), "timm:test_resnet", 32, "full") is None  # nothing trained: no promise
    run = tiny_lfw_run(runs_root())
    speed = measured_speed(runs_root(), "timm:test_resnet", 32, "full")
    assert speed is not None and speed.run_id == run.run_id and speed.images_per_s > 0
    assert speed.seconds(int(speed.images_per_s * 10)) == pytest.approx(10, rel=0.01)
    assert measured_speed(runs_root(), "timm:test_resnet", 64, "full") is None  # another size: no estimate
    assert measured_speed(runs_root(), "timm:test_resnet", 32, "feature-extraction") is None
    assert [format_duration(s) for s in (0.2, 45, 300, 7200)] == ["1 s", "45 s", "5 min", "2.0 h"]
