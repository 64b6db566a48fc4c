"""Nonsense settings: refused before anything runs, one line on stderr, exit code 2, nothing on disk.

Most cases call the CLI's ``main`` in this process (the same code a terminal runs, only faster);
a few run ``python -m engine`` for real to prove the process-level promise too.
"""
from __future__ import annotations

import pytest

from engine.cli import main
from engine.config import ConfigError, TrainConfig
from engine.training.loop import fit
from tests.hostile._cli import TINY_TRAIN, engine


def _with(args: list[str], **overrides: str) -> list[str]:
    """TINY_TRAIN with some flags replaced (or added)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        key = a.lstrip("-").replace("-", "_")
        if a.startswith("--") and key in overrides:
            skip = True
            continue
        out.append(a)
    for key, value in overrides.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out


BAD_TRAIN = {
    "epochs-0": ({"epochs": "0"}, "epochs must be between 1"),
    "epochs-negative": ({"epochs": "-3"}, "epochs must be between 1"),
    "epochs-not-a-number": ({"epochs": "ten"}, "invalid int value"),
    "batch-0": ({"batch_size": "0"}, "batch_size must be between 1"),
    "batch-huge": ({"batch_size": "10000000"}, "batch_size must be between 1"),
    "workers-negative": ({"workers": "-1"}, "num_workers must be between 0"),
    "image-size-0": ({"image_size": "0"}, "image_size must be between 8"),
    "image-size-huge": ({"image_size": "100000"}, "image_size must be between 8"),
    "image-size-400-digits": ({"image_size": "1" + "0" * 400}, "(401 characters)"),  # cut, not echoed
    "lr-nan": ({"lr": "nan"}, "finite"),
    "lr-inf": ({"lr": "inf"}, "finite"),
    "lr-zero": ({"lr": "0"}, "positive"),
    "lr-negative": ({"lr": "-0.1"}, "positive"),
    "lr-absurd": ({"lr": "1e6"}, "far beyond"),
    "patience-negative": ({"patience": "-1"}, "patience must be between 0"),
    "val-fraction-1": ({"val_fraction": "1"}, "val_fraction must be in"),
    "val-fraction-0": ({"val_fraction": "0"}, "val_fraction must be in"),
    "val-fraction-nan": ({"val_fraction": "nan"}, "val_fraction must be a finite"),
    "max-per-class-0": ({"max_per_class": "0"}, "max_per_class must be between 1"),
    "max-per-class-1": ({"max_per_class": "1"}, "no validation images"),  # all 10 train: nothing measures the run
    "batch-1-at-1x1-maps": ({"batch_size": "1"}, "a batch of one image cannot train BatchNorm"),  # 32 px: 1x1
    "memory-budget-tiny": ({"memory_budget": "1MB"}, "one image at 32 px needs about"),
    "memory-budget-tiny-cached": ({"memory_budget": "1MB", "strategy": "feature-extraction"},
                                  "the cached features of one image need about"),  # not "at 96 px": features
    "unfreeze-epoch-0": ({"unfreeze": "0:1"}, "unfreeze epochs start at 1"),
    "unfreeze-garbage": ({"unfreeze": "soon"}, "EPOCH:STAGES"),
    "strategy-unknown": ({"strategy": "melt"}, "Unknown freeze strategy"),
    "last-n-garbage": ({"strategy": "last-n:x"}, "last-n needs a number"),
    "last-n-negative": ({"strategy": "last-n:-2"}, "last_n must be 0 or more"),
    "data-empty": ({"data": ""}, "data must be given"),
    "data-blank": ({"data": "   "}, "data must be given"),
    "model-empty": ({"model": ""}, "model must be given"),
    "device-unknown": ({"device": "tpu:9"}, "device"),
    "bn-unknown": ({"bn": "melt"}, "invalid choice"),
    "monitor-unknown": ({"monitor": "val_f1"}, "invalid choice"),
    "flag-unknown": ({"turbo": "1"}, "unrecognized arguments"),
}


@pytest.mark.parametrize("name", list(BAD_TRAIN), ids=list(BAD_TRAIN))
def test_bad_train_setting_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, name):
    overrides, phrase = BAD_TRAIN[name]
    out = tmp_path / "runs"
    args = ["train", *_with(TINY_TRAIN, **overrides), "--epochs" if "epochs" not in overrides else "--json",
            *(["1"] if "epochs" not in overrides else []), "--out", str(out)]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase.lower() in lines[0].lower(), err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("command", [["runs"], ["eval", "some-run"]], ids=["runs", "eval"])
def test_runs_folder_that_is_a_file_is_refused_by_every_command(tmp_path, capsys, command):
    target = tmp_path / "runs.txt"
    target.write_text("my notes")
    rc = main([*command, "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and len(err.strip().splitlines()) == 1, err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "runs.txt"
    target.write_text("my notes")
    rc = main(["train", *TINY_TRAIN, "--epochs", "1", "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "my notes"


@pytest.mark.parametrize("name", ["epochs-0", "lr-nan", "data-empty", "flag-unknown"])
def test_bad_settings_through_a_real_process(tmp_path, name):
    overrides, phrase = BAD_TRAIN[name]
    ran = engine("train", *_with(TINY_TRAIN, **overrides), "--out", str(tmp_path / "runs"))
    ran.assert_one_line_error(phrase)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_image_size_a_vit_cannot_take_is_refused_naming_the_setting(tmp_path, capsys):
    rc = main(["train", *_with(TINY_TRAIN, model="timm:test_vit", image_size="37"), "--epochs", "1",
               "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "image size 37 does not fit" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unfreeze_more_stages_than_the_model_has_is_refused(tmp_path, capsys):
    rc = main(["train", *_with(TINY_TRAIN, strategy="feature-extraction", unfreeze="2:99"), "--epochs", "2",
               "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "backbone stages" in err, err


CONFIG_FIELDS = {
    "schedule": ("warp", "Unknown schedule"), "optimizer": ("lion", "Unknown optimizer"),
    "amp": ("fp8", "Unknown amp"), "feature_cache": ("maybe", "Unknown feature_cache"),
    "warmup_frac": (1.5, "warmup_frac"), "label_smoothing": (-0.1, "label_smoothing"),
    "grad_clip": (0.0, "grad_clip"), "weight_decay": (float("inf"), "weight_decay"),
    "epochs": (2.5, "whole number"), "channels_last": ("yes", "channels_last"),
    "crop_pct": (0.0, "crop_pct"), "test_fraction": (0.9, "below 1"),
}


@pytest.mark.parametrize("field", list(CONFIG_FIELDS), ids=list(CONFIG_FIELDS))
def test_config_dataclass_refuses_nonsense(field):
    value, phrase = CONFIG_FIELDS[field]
    with pytest.raises(ConfigError, match=phrase) as info:
        TrainConfig(**{field: value})
    assert info.value.field in (field, "val_fraction")


def test_a_loss_that_turns_nan_stops_as_diverged_and_keeps_the_last_finite_checkpoint(tmp_path):
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run

    # plain SGD at LR 10 on a tiny ViT: a finite first epoch (slow warm-up), then the loss explodes
    config = TrainConfig(model="timm:test_vit", weights="none", data="digits", image_size=32, batch_size=16,
                         max_per_class=12, num_workers=0, epochs=4, plan=FreezePlan.full(head_lr=10.0).to_dict(),
                         schedule="cosine", warmup_frac=0.5, optimizer="sgd", weight_decay=0.0)
    run = create_run(tmp_path, config.to_dict())
    result = fit(config, run)
    assert result.status == "diverged", result
    assert "lower the learning rate" in result.reason and result.epochs_done >= 1
    assert run.status().state == "diverged"
    assert [m["epoch"] for m in run.metrics()] == list(range(1, result.epochs_done + 1))
    assert run.checkpoint_meta("last")["epoch"] == result.epochs_done
    import torch

    from engine.runs.checkpoint_file import load_weights

    for path in run.path.glob("*.safetensors"):
        assert all(bool(torch.isfinite(t).all()) for t in load_weights(path).values() if t.is_floating_point())


OTHER_COMMANDS = {
    "summary-input-size-0": (["summary", "timm:test_resnet", "--input-size", "0"], "between 8"),
    "summary-num-classes-negative": (["summary", "timm:test_resnet", "--num-classes", "-1"], "between 2"),
    "summary-unknown-model": (["summary", "timm:no_such_net_xyz"], "no_such_net_xyz"),
    "predict-top-k-0": (["predict", "x.png", "--top-k", "0"], "between 1"),
    "freeze-unknown-strategy": (["freeze", "timm:test_resnet", "--strategy", "melt"], "Unknown freeze strategy"),
    "freeze-lr-nan": (["freeze", "timm:test_resnet", "--head-lr", "nan"], "finite"),
    "eval-unknown-run": (["eval", "no-such-run"], "No run at"),
    "compare-epochs-0": (["compare", "--epochs", "0"], "epochs must be between 1"),
    "resume-unknown-run": (["train", "--resume", "no-such-run"], "No run at"),
    "resume-empty": (["train", "--resume", ""], "--resume needs a run"),
    # Path("") is the current folder: a config.json there was read as a run
    "eval-empty-run": (["eval", ""], "No run given"),
    "mislabeled-empty-run": (["data", "mislabeled", ""], "No run given"),
    "resume-with-other-settings": (["train", "--resume", "some-run", "--lr", "5", "--data=lfw"],
                                   "--data, --lr cannot change"),  # silently ignored before
    "summary-vit-size-off-its-patch-grid": (["summary", "timm:test_vit", "--input-size", "33"], "does not fit"),
    "no-command": ([], "required"),
}


@pytest.mark.parametrize("name", list(OTHER_COMMANDS), ids=list(OTHER_COMMANDS))
def test_other_commands_refuse_nonsense_in_one_line(tmp_path, capsys, name):
    argv, phrase = OTHER_COMMANDS[name]
    if argv and argv[0] in ("eval", "compare", "train", "data"):
        argv = [*argv, "--out", str(tmp_path / "runs")]
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert phrase.lower() in lines[0].lower(), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
