"""Hostile input around class balance: a nonsense setting is one line and exit 2 with nothing on disk,
a config.json edited by hand is refused by name, and odd class counts never break the data report."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.config import ConfigError, TrainConfig
from engine.data.balance import class_imbalance
from engine.data.datasets import load_folder, validate
from tests.hostile._cli import TINY_TRAIN


@pytest.mark.parametrize("value", ["oversample", "WEIGHTS", "", "weights,sampler"])
def test_unknown_balance_on_the_command_line_is_one_line_and_leaves_nothing(tmp_path, capsys, value):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY_TRAIN, "--balance", value, "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--balance" in lines[0] and "invalid choice" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("value", ["Weights", "oversample", None, True, 2, ["weights"], {"kind": "weights"}])
def test_a_hand_edited_config_json_with_a_bad_balance_is_refused_by_name(value):
    data = json.loads(json.dumps({**TrainConfig().to_dict(), "balance": value}))
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(data)
    assert exc.value.field == "balance" and "Unknown balance" in str(exc.value)


def test_odd_class_counts_never_break_the_report(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("many", 40), ("one", 1), ("none", 0)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    report = validate(load_folder(tmp_path))
    assert not report.ok  # an empty class and a class of one image cannot be split: refused as before
    assert report.imbalance["ratio"] == 40.0 and report.imbalance["smallest"] == "one"  # the empty class is no ratio
    assert class_imbalance({}) is None and class_imbalance({"a": 0, "b": 0}) is None
    assert class_imbalance({"a": 3, "b": 3})["ratio"] == 1.0
