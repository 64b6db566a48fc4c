"""Augmentation you can see (issue 28, point 4): the SPEC, its refusals, old runs' true, the preview grid
(engine, CLI and Training page), mixup/cutmix, and a tiny augmented run that records its SPEC. The exported
script's exact replay of an augmented run is a case of tests/test_codegen.py ("augment-spec")."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from engine.cli import build_parser, main
from engine.config import ConfigError, TrainConfig
from engine.data.augment import AugmentSpec, canonical, parse_augment
from engine.data.augment_preview import GAP, augment_preview, augmented_tiles, preview_images
from engine.data.mixing import mix_batch
from engine.data.transforms import resize_target, train_transform
from engine.models.factory import create_model
from tests.conftest import ROOT

FULL = "flip,rotate:15,color:0.3,crop:0.7,randaug:9,mixup:0.2,cutmix:1,smooth:0.1"


# ------------------------------------------------------------------ the SPEC
def test_specs_parse_to_one_canonical_text():
    spec = parse_augment(" Crop:0.70 , flip,rotate:15, randaug , smooth:0.1,mixup:0.2,color:0.3,cutmix:1.0")
    assert spec == AugmentSpec(flip=True, rotate=15, color=0.3, crop=0.7, randaug=9, mixup=0.2, cutmix=1, smooth=0.1)
    assert spec.text() == FULL and parse_augment(spec.text()) == spec
    assert spec.per_image and spec.mixes and spec.auto_augment == "rand-m9-mstd0.5"
    for none in (False, None, "", "none", "off"):
        assert not parse_augment(none) and canonical(none) is False
    for default in (True, "default", "true"):
        assert canonical(default) == "crop:0.7"
    assert canonical("default,flip") == "flip,crop:0.7"
    only_loss = parse_augment("smooth:0.2")
    assert only_loss and not only_loss.per_image and not only_loss.mixes  # any augmentation: no feature cache


@pytest.mark.parametrize("spec, part, words", [
    ("rotate:400", "rotate", "rotate must be in (0, 180]"),
    ("color:-1", "color", "color must be in (0, 1]"),
    ("crop:0", "crop", "crop must be in (0, 1]"),
    ("crop:1.5", "crop", "crop must be in (0, 1]"),
    ("smooth:1", "smooth", "smooth must be in (0, 1)"),
    ("randaug:2.5", "randaug", "randaug needs a whole number"),
    ("mixup:nan", "mixup", "mixup must be in (0, 10]"),
    ("rotate", "rotate", "rotate needs a value, e.g. rotate:15"),
    ("flip:3", "flip", "flip takes no value"),
    ("flip,rotate:5,flip", "flip", "flip is given twice"),
    ("flip,blur:3", "augment", "unknown operation 'blur'"),
    (7, "augment", "augment must be a SPEC"),
])
def test_nonsense_is_refused_in_one_line_naming_the_part(spec, part, words):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(augment=spec)
    exc = caught.value
    assert exc.field == "augment" and exc.part == part
    assert words in str(exc) and "\n" not in str(exc)


def test_settings_that_contradict_the_spec_are_refused():
    with pytest.raises(ConfigError, match="label smoothing is set twice"):
        TrainConfig(augment="smooth:0.1", label_smoothing=0.2)
    with pytest.raises(ConfigError, match="not offered together"):
        TrainConfig(augment="mixup:0.2", balance="weights")
    assert TrainConfig(augment="smooth:0.1", label_smoothing=0.1).smoothing() == 0.1
    assert TrainConfig(label_smoothing=0.05).smoothing() == 0.05


def test_an_old_runs_true_loads_as_the_transform_it_trained_with():
    """config.json of a run from before SPECs: "augment": true (with or without hflip) is crop:0.7, and the
    transform is exactly timm's create_transform call those runs used (same steps, same RNG draws)."""
    from timm.data import create_transform

    old = {"model": "timm:test_efficientnet", "weights": "none", "augment": True, "hflip": True, "image_size": 40}
    config = TrainConfig.from_dict(json.loads(json.dumps(old)))
    assert config.augment == "crop:0.7" and config.to_dict()["augment"] == "crop:0.7"
    assert config.augment_spec() == AugmentSpec(flip=True, crop=0.7)
    assert TrainConfig.from_dict({**old, "augment": False}).augment_spec() == AugmentSpec()  # hflip alone: nothing
    spec = create_model(config.model, weights="none", num_classes=10, check_output=False).spec
    cfg = spec.data_config(40)
    then = create_transform(input_size=cfg["input_size"], is_training=True, scale=(0.7, 1.0), ratio=(0.85, 1.18),
                            hflip=0.5, vflip=0.0, color_jitter=0.0, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"])
    now = train_transform(spec, 40, augment=config.augment_spec())
    assert repr(now) == repr(then)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    draws = []
    for tf in (then, now):
        random.seed(3)
        torch.manual_seed(3)
        draws.append(tf(image))
    assert torch.equal(*draws)
    # a SPEC without crop keeps the eval framing; the decode size still comes from it
    framed = train_transform(spec, 40, augment="rotate:10,color:0.2,randaug:5")
    assert resize_target(framed) == resize_target(train_transform(spec, 40, augment=False))


# ------------------------------------------------------------------ mixup / cutmix
def test_mixing_blends_images_and_labels_alike():
    """Image i is blended with image n-1-i by the same weight as its smoothed one-hot label; an odd batch's
    middle image is blended with itself."""
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(5)])
    y = torch.tensor([0, 1, 1, 1, 2])
    torch.manual_seed(0)
    mixed, soft = mix_batch(x, y, 3, mixup=0.4, cutmix=0.0, smoothing=0.1)
    off = 0.1 / 3
    lam = (soft[0, 0] - off) / 0.9  # image 0 (class 0) with image 4 (class 2)
    assert 0 < lam < 1 and torch.allclose(soft[0], torch.tensor([lam * 0.9 + off, off, (1 - lam) * 0.9 + off]))
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), float(4 * (1 - lam))))
    assert torch.allclose(mixed[2], x[2]) and torch.allclose(soft.sum(1), torch.ones(5))
    torch.manual_seed(1)
    cut, soft = mix_batch(x, y, 3, mixup=0.0, cutmix=1.0)
    pasted = float((cut[0] != x[0]).float().mean())  # the share of image 0 that now shows image 4
    assert 0 < pasted < 1 and set(cut[0].unique().tolist()) == {0.0, 4.0}
    assert torch.allclose(soft[0], torch.tensor([1 - pasted, 0.0, pasted]))


# ------------------------------------------------------------------ the preview
@pytest.fixture(scope="module")
def digit_images():
    return preview_images("digits")


def test_preview_is_eight_different_images_seeded_and_following_the_spec(digit_images):
    state = (random.getstate(), torch.random.get_rng_state(), np.random.get_state()[1].copy())
    tiles = augmented_tiles(digit_images, "flip,rotate:30,color:0.4,crop:0.5", n=8, seed=0, image_size=48)
    assert len(tiles) == 8 and all(t.size == (48, 48) and t.mode == "RGB" for t in tiles)
    assert len({t.tobytes() for t in tiles}) == 8  # eight different draws
    grid = augment_preview(digit_images, "flip,rotate:30,color:0.4,crop:0.5", seed=0, image_size=48)
    assert grid.size == (4 * 48 + 3 * GAP, 2 * 48 + GAP)
    assert grid.crop((48 + GAP, 0, 2 * 48 + GAP, 48)).tobytes() == tiles[1].tobytes()
    again = augment_preview(digit_images, "flip,rotate:30,color:0.4,crop:0.5", seed=0, image_size=48)
    assert again.tobytes() == grid.tobytes()  # deterministic by seed
    assert augment_preview(digit_images, "flip,rotate:30,color:0.4,crop:0.5", seed=1, image_size=48).tobytes() \
        != grid.tobytes()
    assert augment_preview(digit_images, "rotate:90", seed=0, image_size=48).tobytes() != grid.tobytes()
    mixed = augment_preview(digit_images, "mixup:1,cutmix:1", seed=0, image_size=48)
    assert mixed.tobytes() != augment_preview(digit_images, "", seed=0, image_size=48).tobytes()
    # the caller's random state is left as it was
    assert random.getstate() == state[0] and torch.equal(torch.random.get_rng_state(), state[1])
    assert np.array_equal(np.random.get_state()[1], state[2])


def test_augment_preview_cli_writes_the_grid_and_refuses_in_one_line(tmp_path, capsys):
    target = tmp_path / "grid.png"
    assert main(["augment-preview", "--data", "digits", "--augment", "flip,rotate:15,crop:0.7", "--image-size", "32",
                 "-o", str(target), "--out", str(tmp_path / "runs")]) == 0
    with Image.open(target) as grid:
        assert grid.format == "PNG" and grid.size == (4 * 32 + 3 * GAP, 2 * 32 + GAP)
    assert "flip,rotate:15,crop:0.7" in capsys.readouterr().err
    for argv in (["--augment", "rotate:400", "-o", str(target)],
                 ["--augment", "blur", "-o", str(target)],
                 ["-o", str(tmp_path / "missing" / "grid.png")],
                 ["-o", str(tmp_path / "grid.jpg")],
                 ["--data", str(tmp_path / "nowhere"), "-o", str(target)]):
        assert main(["augment-preview", *argv, "--out", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------ a run records its SPEC
def test_bare_augment_is_the_default_and_a_spec_is_kept():
    parser = build_parser()
    common = ["train", "--data", "digits"]
    assert parser.parse_args(common).augment is False
    assert parser.parse_args([*common, "--augment"]).augment == "default"
    assert parser.parse_args([*common, "--augment", "--epochs", "2"]).augment == "default"
    assert parser.parse_args([*common, "--augment", "flip,crop:0.8"]).augment == "flip,crop:0.8"


def test_a_tiny_augmented_run_records_its_spec(tmp_path, capsys):
    assert main(["train", "--model", "timm:test_resnet", "--weights", "none", "--data", "lfw", "--image-size", "32",
                 "--max-per-class", "8", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path), "--json",
                 "--augment", "Rotate:10, flip,mixup:0.2,cutmix:1,smooth:0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["augment"] == "flip,rotate:10,mixup:0.2,cutmix:1,smooth:0.1"
    assert report["status"] == "finished" and report["epochs"] == 1 and report["feature_cache"] is False
    assert TrainConfig.from_dict(config).smoothing() == 0.1
    assert main(["train", "--augment", "rotate:400", "--data", "lfw", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------ the Training page
def _by_label(elements, label):
    return next(e for e in elements if e.label == label)


def _previews(at: AppTest) -> list[str]:
    return [str(img.proto) for img in at.get("image") if "augmented versions" in str(img.proto)]


def test_training_page_previews_the_augmentation_and_says_a_bad_value_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = AppTest.from_file(str(ROOT / "views" / "training.py"), default_timeout=120)
    at.session_state["active_model"] = "timm:test_resnet"
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = None
    at.run()
    _by_label(at.radio, "Data").set_value("lfw faces (built-in)").run()
    assert not _previews(at)  # augmentation off: no controls, no preview
    _by_label(at.toggle, "Augment").set_value(True).run()
    assert not at.exception
    first = _previews(at)
    assert len(first) == 1 and "(crop:0.7)" in first[0]  # today's default, shown
    _by_label(at.number_input, "Rotate ± degrees").set_value(20)
    _by_label(at.checkbox, "Mirror (flip)").check().run()
    moved = _previews(at)
    assert len(moved) == 1 and "(flip,rotate:20,crop:0.7)" in moved[0] and moved[0] != first[0]
    _by_label(at.number_input, "Rotate ± degrees").set_value(400).run()
    assert not at.exception
    beside = [col for col in at.columns if any(n.label == "Rotate ± degrees" for n in col.number_input)]
    assert beside and any("rotate must be in (0, 180" in e.value for e in beside[0].error)
    assert _by_label(at.button, "Start training").disabled
