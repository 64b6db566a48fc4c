"""Exported code never drifts: the "show me the code" script trains exactly what the engine trains.

Seven real tiny runs are trained by the engine, exported with ``python -m engine export`` (its
``main``, in process) and each script runs in its own Python process in a temp folder, where the
engine cannot be imported. The match is EXACT, not approximate: the script's final validation
accuracy and loss (printed with repr) equal the engine's last epoch bit for bit, and every epoch's
train/val loss and accuracy agree to the 6 decimals the script prints. (The brief allowed 1 point of
accuracy; none is needed.)

Cheaper checks hold the template's pieces against the engine's on more models and plans than the
five runs: the split, the transforms, reading a folder, freezing (requires_grad and the modules held
in eval), the optimizer groups and the LR schedule.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.anatomy.stages import model_stages
from engine.cli import main
from engine.config import SCHEDULES, TrainConfig
from engine.data.archive import IGNORED_NAMES
from engine.data.datasets import load_folder
from engine.data.images import IMAGE_SUFFIXES
from engine.data.splits import split_indices
from engine.data.transforms import eval_transform, train_transform
from engine.freeze.plan import FreezePlan, plan_effect
from engine.freeze.plan import param_groups as engine_param_groups
from engine.models.factory import create_model
from engine.outputs import script_template as tpl
from engine.outputs.code import TEMPLATE_PATH, generate_script, script_settings, template_setting_names
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.policies import lr_factor
from tests.conftest import ROOT

DIGITS = [str(i) for i in range(10)]
IMBALANCED = "<imbalanced digits folder>"  # made by the fixture: classes 0/1/2 with 40/40/8 real digits
TINY = dict(weights="none", data="digits", image_size=32, batch_size=16, max_per_class=20, num_workers=0)
CASES = {
    # (a) a timm CNN, full fine-tune, with augmentation (timm's random crops draw on Python's RNG) and flips,
    # each batch of 16 in micro-batches (BatchNorm sees slices of 6/5/5 in both)
    "cnn-full": dict(model="timm:test_resnet", epochs=2, augment=True, hflip=True, micro_batch=6,
                     plan=FreezePlan.full(head_lr=1e-2, backbone_lr_ratio=1.0).to_dict()),
    # (b) feature extraction with frozen BN: the engine trains the head on cached features
    "feature-extraction": dict(model="timm:test_efficientnet", epochs=2,
                               plan=FreezePlan.feature_extraction(head_lr=5e-2).to_dict()),
    # (b2) the last stage on cached inputs: the frozen stages run once (engine/training/prefix_cache.py)
    "last-n-cached": dict(model="timm:test_resnet", epochs=2,
                          plan=FreezePlan.last(1, head_lr=5e-2, backbone_lr_ratio=1.0).to_dict()),
    # (c) last-N with gradual unfreezing, SGD, grad clipping, one-cycle schedule
    "last-n-gradual": dict(model="timm:test_resnet", epochs=2, optimizer="sgd", grad_clip=1.0, schedule="onecycle",
                           plan=FreezePlan.last(1, head_lr=5e-2, backbone_lr_ratio=1.0, unfreeze_schedule=((1, 3),)).to_dict()),
    # (d) a ViT with BN policy "train" (the old script crashed on its cls_token), on lfw
    "vit-bn-train": dict(model="timm:test_vit", data="lfw", max_per_class=30, epochs=2,
                         plan=FreezePlan.last(1, head_lr=3e-3, bn_policy="train").to_dict()),
    # (e) a torchvision model, BN adapting in frozen stages, label smoothing, constant LR
    "torchvision": dict(model="tv:mobilenet_v3_small", data="lfw", epochs=2, label_smoothing=0.1, schedule="constant",
                        plan=FreezePlan.last(2, head_lr=3e-3, bn_policy="adapt").to_dict()),
    # (f) class-weighted loss (balance "weights") on an imbalanced folder of real digits, in micro-batches, the
    # first epoch at 16 px (progressive resizing)
    "balance-weights": dict(model="timm:test_resnet", data=IMBALANCED, max_per_class=None, epochs=2, balance="weights",
                            micro_batch=6, label_smoothing=0.1, progressive_from=16,
                            plan=FreezePlan.full(head_lr=1e-2, backbone_lr_ratio=1.0).to_dict()),
    # (h) an augmentation SPEC: crops, flips, rotation, colour jitter and RandAugment per image (python's random,
    # numpy's and torch's RNG), mixup/cutmix per batch (torch's) and label smoothing in the soft targets
    "augment-spec": dict(model="timm:test_resnet", epochs=1, max_per_class=12, micro_batch=6,
                         augment="flip,rotate:15,color:0.3,crop:0.7,randaug:9,mixup:0.4,cutmix:1,smooth:0.1",
                         plan=FreezePlan.full(head_lr=1e-2, backbone_lr_ratio=1.0).to_dict()),
    # (g) the balanced sampler on the feature-cache path (a TensorDataset of features)
    "balance-sampler": dict(model="timm:test_efficientnet", data=IMBALANCED, max_per_class=None, epochs=2,
                            balance="sampler", plan=FreezePlan.feature_extraction(head_lr=5e-2).to_dict()),
}
EPOCH_LINE = re.compile(r"^epoch (\d+): train_loss (\S+) train_acc (\S+) val_loss (\S+) val_acc (\S+)$", re.M)
FINAL_LINE = re.compile(r"^final val_acc (\S+) val_loss (\S+)$", re.M)


@dataclass
class Exported:
    config: TrainConfig
    history: list[dict]
    feature_cache: bool
    script: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _imbalanced_digits(root: Path) -> Path:
    """One folder per class of real digits (PNG), 40/40/8 images: balancing has something to even out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, n in ((0, 40), (1, 40), (2, 8)):
        (root / str(label)).mkdir()
        for i in np.flatnonzero(digits.target == label)[:n]:
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def exported(runs_root, tmp_path_factory):
    """Each case trained by the engine in a run folder, exported by the CLI, and its script started
    at once in a subprocess (it runs while the next case trains). All on one thread each: two
    thread pools per core spinning against each other took 56 s, one thread each 30 s."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    started: dict[str, Exported] = {}
    imbalanced = _imbalanced_digits(tmp_path_factory.mktemp("imbalanced"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # engine and scripts on one thread each: they run side by side on 2 cores
    try:
        for name, kw in CASES.items():
            config = TrainConfig(**{**TINY, **kw, **({"data": str(imbalanced)} if kw.get("data") == IMBALANCED else {})})
            result = fit(config, create_run(runs_root, config.to_dict(), run_id=name))
            assert result.status == "finished", result.reason
            script = tmp_path_factory.mktemp(name) / "train.py"
            assert main(["export", name, "--out", str(runs_root), "--format", "script", "-o", str(script)]) == 0
            proc = subprocess.Popen([sys.executable, script.name], cwd=script.parent, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            started[name] = Exported(config, result.history, result.feature_cache, script, proc)
        torch.set_num_threads(threads)
        yield started
    finally:
        torch.set_num_threads(threads)
        for e in started.values():
            if e.proc.poll() is None:
                e.proc.kill()
                e.proc.communicate()


@pytest.mark.parametrize("name", list(CASES))
def test_script_reproduces_the_engine_run_exactly(exported, name):
    e = exported[name]
    out, err = e.proc.communicate(timeout=400)
    assert e.proc.returncode == 0, err[-3000:]
    epochs = EPOCH_LINE.findall(out)
    assert [int(row[0]) for row in epochs] == [h["epoch"] for h in e.history] == list(range(1, e.config.epochs + 1))
    for row, want in zip(epochs, e.history):
        got = dict(zip(("train_loss", "train_acc", "val_loss", "val_acc"), map(float, row[1:])))
        for key, value in got.items():
            assert value == pytest.approx(want[key], abs=1e-6), (name, want["epoch"], key)
    final = FINAL_LINE.search(out)
    assert final, out
    acc, loss = float(final.group(1)), float(final.group(2))
    assert acc == e.history[-1]["val_acc"]  # exact; the brief's bound was 1 point
    assert loss == e.history[-1]["val_loss"]
    assert (e.script.parent / "model.safetensors").is_file()
    # the cases exercise what they claim to
    assert e.feature_cache == (name in ("feature-extraction", "balance-sampler", "last-n-cached"))
    assert ("CACHE_SKIP = []" not in e.script.read_text()) == (name == "last-n-cached")
    assert f"BALANCE = {e.config.balance!r}" in e.script.read_text()
    assert ("PROGRESSIVE_FROM = 16" in e.script.read_text()) == (name == "balance-weights")
    if name == "last-n-gradual":
        assert e.history[1]["trainable_params"] > e.history[0]["trainable_params"]
    if name == "augment-spec":  # the SPEC reached the script: per image, per batch and in the loss
        text = e.script.read_text()
        assert "'randaug': 9" in text and "'mixup': 0.4" in text and "LABEL_SMOOTHING = 0.1" in text


def test_scripts_are_standalone_and_lint_clean(exported):
    scripts = [e.script for e in exported.values()]
    for script in scripts:
        tree = ast.parse(script.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "engine" for m in imported), script
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--config", str(ROOT / "ruff.toml"), str(TEMPLATE_PATH),
                           *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the CLI
def test_export_cli_writes_stdout_and_refuses_in_one_line(exported, runs_root, tmp_path, capsys):
    config = exported["cnn-full"].config
    assert main(["export", "cnn-full", "--out", str(runs_root)]) == 0
    assert capsys.readouterr().out == generate_script(config, DIGITS, "cnn-full")
    assert main(["export", str(runs_root / "vit-bn-train")]) == 0  # a path works from anywhere
    assert "CLASS_NAMES = ['non-face', 'face']" in capsys.readouterr().out
    for argv in (["export", "no-such-run", "--out", str(runs_root)],
                 ["export", "cnn-full", "--out", str(runs_root), "-o", str(tmp_path)],
                 ["export", "cnn-full", "--out", str(runs_root), "-o", str(tmp_path / "missing" / "x.py")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["export", "cnn-full", "--out", str(runs_root), "--format", "pdf"])
    assert exc.value.code == 2


def test_export_of_a_run_without_checkpoint_takes_classes_from_its_data(tmp_path, capsys):
    config = TrainConfig(model="timm:test_resnet", **{**TINY, "data": "lfw"})
    create_run(tmp_path, config.to_dict(), run_id="fresh")
    assert main(["export", "fresh", "--out", str(tmp_path)]) == 0
    assert "CLASS_NAMES = ['non-face', 'face']" in capsys.readouterr().out


# ------------------------------------------------------------------ the template's pieces vs the engine's
def _use(monkeypatch, config: TrainConfig, names: list[str]) -> None:
    for key, value in script_settings(config, names):
        monkeypatch.setattr(tpl, key, value)


def test_template_block_is_the_generators_and_only_it_changes():
    config = TrainConfig(model="timm:test_vit", **TINY)
    names = [n for n, _ in script_settings(config, DIGITS)]
    assert template_setting_names() == names
    text, template = generate_script(config, DIGITS, "x"), TEMPLATE_PATH.read_text()
    head, tail = template.split("# --- settings (generated) ---")[0], template.split("# --- end settings ---")[1]
    assert text.startswith(head) and text.endswith(tail) and "MODEL_ARCH = 'test_vit'" in text


def test_split_matches_the_engine(monkeypatch):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=300).tolist()
    for max_per_class, val, test, seed in ((None, 0.2, 0.0, 0), (25, 0.3, 0.1, 5), (4, 0.5, 0.0, 11)):
        settings = SimpleNamespace(max_per_class=max_per_class, val_fraction=val, test_fraction=test, split_seed=seed)
        for key, value in (("MAX_PER_CLASS", max_per_class), ("VAL_FRACTION", val), ("TEST_FRACTION", test),
                           ("SPLIT_SEED", seed)):
            monkeypatch.setattr(tpl, key, value)
        assert tpl.split_indices(labels) == tuple(split_indices(SimpleNamespace(labels=labels), settings))


@pytest.mark.parametrize("augment, hflip", [(False, False), (True, False), (True, True),
                                            ("rotate:20,color:0.2,randaug:7,mixup:0.2", True), ("smooth:0.1", False)])
def test_transforms_match_the_engine(monkeypatch, augment, hflip):
    config = TrainConfig(model="timm:test_efficientnet", **{**TINY, "image_size": 40, "crop_pct": None},
                         augment=augment, hflip=hflip)
    _use(monkeypatch, config, DIGITS)
    spec = create_model(config.model, weights="none", num_classes=10, check_output=False).spec
    engine_train = train_transform(spec, 40, augment=config.augment_spec())
    train_tf, eval_tf = tpl.make_transforms()
    assert repr(train_tf) == repr(engine_train)
    assert repr(eval_tf) == repr(eval_transform(spec, 40))


def test_mixing_matches_the_engine():
    from engine.data.mixing import mix_batch

    x, y = torch.rand(7, 3, 12, 10), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    for mixup, cutmix, smoothing in ((0.4, 0.0, 0.0), (0.0, 1.0, 0.1), (0.2, 1.0, 0.1)):
        for seed in range(3):
            torch.manual_seed(seed)
            ours = mix_batch(x, y, 3, mixup, cutmix, smoothing)
            torch.manual_seed(seed)
            theirs = tpl.mix_batch(x, y, 3, mixup, cutmix, smoothing)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_lr_schedule_matches_the_engine(monkeypatch):
    for schedule in SCHEDULES:
        for warmup in (0.0, 0.1, 0.5):
            monkeypatch.setattr(tpl, "SCHEDULE", schedule)
            monkeypatch.setattr(tpl, "WARMUP_FRAC", warmup)
            for total in (1, 7, 50):
                assert [tpl.lr_factor(s, total) for s in range(total)] == \
                    [lr_factor(s, total, schedule, warmup) for s in range(total)]


def _plans(first_stage: str) -> list[FreezePlan]:
    return [FreezePlan.feature_extraction(),
            FreezePlan.full(head_lr=1e-2, backbone_lr_ratio=0.3, stage_lr_decay=0.5),
            FreezePlan.last(1, bn_policy="adapt", unfreeze_schedule=((1, 2), (2, 50))),
            FreezePlan.custom(stages=(first_stage,), patterns=("*.bias",), bn_policy="train")]


@pytest.mark.parametrize("model", ["timm:test_resnet", "timm:test_vit", "timm:test_efficientnet",
                                   "tv:mobilenet_v3_small", "tv:squeezenet1_1"])
def test_freezing_and_optimizer_groups_match_the_engine(monkeypatch, model):
    """Per epoch: which parameters train, which modules stay in eval, and the optimizer groups
    (order, members, learning rate, weight decay) are the engine's."""
    handle = create_model(model, weights="none", num_classes=3, check_output=False)
    module = handle.module
    stages = model_stages(module, handle.spec.head)
    names_of = {id(m): n for n, m in module.named_modules()}
    for plan in _plans(stages[0].name):
        config = TrainConfig(model=model, **TINY, epochs=3, plan=plan.to_dict())
        _use(monkeypatch, config, ["a", "b", "c"])
        for epoch in (1, 2, 3):
            effect = plan_effect(module, stages, plan, epoch - 1)
            held = tpl.set_trainable(module, epoch)
            assert {n: p.requires_grad for n, p in module.named_parameters()} == effect.trainable
            assert sorted(names_of[id(m)] for m in held) == sorted(effect.eval_modules)
            want = [(g["name"], [id(p) for p in g["params"]], g["lr"], g["weight_decay"])
                    for g in engine_param_groups(module, stages, plan, config.weight_decay)]
            got = [(g["name"], [id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in tpl.param_groups(module)]
            assert got == want, (model, plan.strategy, epoch)


def test_folder_reading_matches_the_engine(tmp_path):
    """Same classes, files, labels and decoded pixels (reduced as the engine decodes) for a folder with
    the usual clutter: hidden files and folders, a non-image, a broken file, nested folders, EXIF
    rotation, palette, grey and transparent images."""
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)

    def picture(w: int, h: int, mode: str = "RGB") -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).convert(mode)

    for folder in ("b_cats/sub", "a_dogs/__MACOSX", ".git", "c_birds"):
        (root / folder).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(300, 200).save(root / "b_cats" / "sub" / "big.jpg", exif=exif)
    picture(40, 30).save(root / "b_cats" / "one.png")
    picture(40, 30).save(root / "b_cats" / ".hidden.png")
    (root / "b_cats" / "notes.txt").write_text("not an image")
    (root / "b_cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    picture(64, 48, "P").save(root / "a_dogs" / "palette.gif")
    picture(50, 50, "RGBA").save(root / "a_dogs" / "alpha.png")
    picture(90, 70, "L").save(root / "a_dogs" / "grey.png")
    picture(20, 20).save(root / "a_dogs" / "__MACOSX" / "junk.png")
    picture(20, 20).save(root / ".git" / "x.png")
    picture(120, 80).save(root / "c_birds" / "wide.jpg", quality=90)
    picture(33, 33).save(root / "c_birds" / "small.bmp")
    assert tpl.IMAGE_SUFFIXES == IMAGE_SUFFIXES and tpl.IGNORED_NAMES == IGNORED_NAMES
    engine_set = load_folder(root)
    classes, labels, files = tpl.list_folder(root)
    assert classes == engine_set.class_names == ["a_dogs", "b_cats", "c_birds"]
    assert labels == engine_set.labels and [str(f) for f in files] == engine_set.sources
    assert len(files) == 7
    for i, path in enumerate(files):
        for side in (None, 16, 40):
            got, want = tpl.decode(path, side), engine_set.image(i, target=side)
            assert got.mode == want.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), (path, side)


@pytest.mark.parametrize("model, weights, classes", [("timm:efficientnet_lite0", "packaged", 3),
                                                     ("timm:test_resnet", "file", 3), ("timm:test_resnet", "file", 5),
                                                     ("tv:mobilenet_v3_small", "file", 2), ("tv:squeezenet1_1", "none", 2),
                                                     ("tv:googlenet", "none", 2)])
def test_model_construction_matches_the_engine(monkeypatch, tmp_path, model, weights, classes):
    """Same weights and the same freshly initialised head (same seed, same random draws) as the engine's
    create_model: packaged weights, a user's file (of 5 classes: its head kept or replaced), none."""
    if weights == "file":
        torch.manual_seed(5)
        source = create_model(model, weights="none", num_classes=5, check_output=False).module.state_dict()
        weights = str(tmp_path / ("w.safetensors" if model.startswith("timm") else "w.pth"))
        if weights.endswith(".safetensors"):
            save_file(source, weights)
        else:
            torch.save(source, weights)
    names = [f"c{i}" for i in range(classes)]
    _use(monkeypatch, TrainConfig(model=model, weights=weights, data="digits"), names)
    torch.manual_seed(0)
    want = create_model(model, weights=weights, class_names=names).module.state_dict()
    torch.manual_seed(0)
    got = tpl.build_model().state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
