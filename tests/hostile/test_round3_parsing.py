"""Round 3, bounded parsing: JSON nested 100,000 deep and numbers like 1e999 or 400 nines, wherever input
is parsed (a run's files, an overrides file, one inside an uploaded zip, a config given to lr-find, the
memory budget and the unfreeze schedule from the CLI or a config). Each is one line (CLI exit 2) or one
EngineError, never RecursionError or OverflowError, and never a traceback.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import EngineError
from engine.core.files import parse_json, read_json
from engine.core.memory import parse_size
from engine.runs.store import describe_run, open_run
from tests.conftest import tiny_lfw_run
from tests.hostile._cli import TINY_TRAIN, engine

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
NINES = "9" * 400
HOSTILE_JSON = {
    "array-100000-deep": (DEEP_ARRAY, "nests deeper than"),
    "object-100000-deep": (DEEP_OBJECT, "nests deeper than"),
    "float-1e999": ('{"x": 1e999}', "out of range"),
    "int-400-nines": ('{"x": ' + NINES + "}", "out of range"),
    "negative-400-nines": ('[-' + NINES + "]", "out of range"),
    "float-400-nines": ('[' + NINES + ".5]", "out of range"),
}


def _one_line_engine_error(exc: BaseException, phrase: str) -> None:
    assert isinstance(exc, EngineError), type(exc)
    assert "\n" not in str(exc) and phrase.lower() in str(exc).lower(), str(exc)


# ------------------------------------------------------------------ the helper itself
@pytest.mark.parametrize("case", list(HOSTILE_JSON), ids=list(HOSTILE_JSON))
def test_parse_json_refuses_in_one_line(case):
    text, phrase = HOSTILE_JSON[case]
    with pytest.raises(EngineError) as caught:
        parse_json(text, "the test file")
    _one_line_engine_error(caught.value, phrase)
    assert str(caught.value).startswith("the test file is refused")


@pytest.mark.parametrize("case", list(HOSTILE_JSON), ids=list(HOSTILE_JSON))
def test_read_json_gives_the_default_not_a_traceback(tmp_path, case):
    path = tmp_path / "status.json"
    path.write_text(HOSTILE_JSON[case][0])
    assert read_json(path, {"default": True}) == {"default": True}


def test_what_the_workbench_writes_still_reads():
    """NaN (a diverged loss), nesting of a real config, 64-bit sizes and ordinary floats stay readable."""
    text = json.dumps({"loss": float("nan"), "size": 2**62, "lr": 1e-300, "plan": {"unfreeze_schedule": [[2, 1]]},
                       "note": "[" * 500})  # brackets inside a string are text, not nesting
    data = parse_json(text, "x")
    assert np.isnan(data["loss"]) and data["size"] == 2**62 and data["note"] == "[" * 500


# ------------------------------------------------------------------ a run folder on disk
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    return tiny_lfw_run(tmp_path_factory.mktemp("round3-parse-runs"), run_id="20240101-000000-parse")


def _copy(run, tmp_path: Path):
    shutil.copytree(run.path, tmp_path / "runs" / run.run_id)
    return open_run(tmp_path / "runs", run.run_id)


@pytest.mark.parametrize("line", ["deep", "1e999", "nines"])
def test_a_hostile_metrics_line_is_skipped_and_the_run_listed(good_run, tmp_path, line):
    run = _copy(good_run, tmp_path)
    good = run.metrics()
    bad = {"deep": DEEP_ARRAY, "1e999": '{"epoch": 2, "val_acc": 1e999}', "nines": '{"epoch": ' + NINES + "}"}[line]
    with run.metrics_path.open("a") as fh:
        fh.write(bad + "\n")
    assert run.metrics() == good  # the bad line only is left out
    row = describe_run(run)
    assert row.state == "finished" and row.epochs.startswith(f"{len(good)}/")


@pytest.mark.parametrize("value", ["1e999", NINES], ids=["1e999", "400-nines"])
def test_a_hostile_number_in_a_runs_config_lists_it_as_damaged(good_run, tmp_path, value):
    run = _copy(good_run, tmp_path)
    text = run.config_path.read_text()
    config = json.loads(text)
    config["plan"]["unfreeze_schedule"] = [["__X__", 1]]
    run.config_path.write_text(json.dumps(config).replace('"__X__"', value))
    row = describe_run(run)
    assert row.state == "damaged" and "config.json" in row.reason, row


# ------------------------------------------------------------------ overrides files, also inside a zip
@pytest.mark.parametrize("case", ["array-100000-deep", "float-1e999", "int-400-nines"])
def test_a_hostile_overrides_file_is_one_data_error(tmp_path, case):
    from engine.data.overrides import read_file

    path = tmp_path / "workbench-overrides.json"
    path.write_text(HOSTILE_JSON[case][0])
    with pytest.raises(EngineError) as caught:
        read_file(path)
    _one_line_engine_error(caught.value, HOSTILE_JSON[case][1])
    assert "workbench-overrides.json" in str(caught.value)


def test_a_deep_overrides_file_inside_an_uploaded_zip_is_one_data_error(tmp_path, monkeypatch):
    from engine.data.datasets import load_source

    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    archive = tmp_path / "faces.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("cats", "dogs"):
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                png = tmp_path / f"{cls}{i}.png"
                img.save(png)
                zf.write(png, f"{cls}/{i}.png")
        zf.writestr("workbench-overrides.json", DEEP_OBJECT)
    with pytest.raises(EngineError) as caught:
        load_source(str(archive))
    _one_line_engine_error(caught.value, "nests deeper than")


# ------------------------------------------------------------------ sizes and schedules
@pytest.mark.parametrize("value", ["1e999", NINES, 10**400, float("inf"), NINES + "GB"],
                         ids=["1e999", "400-nines", "int-10e400", "inf", "400-nines-GB"])
def test_the_memory_budget_field_refuses_in_one_line(value):
    with pytest.raises(EngineError) as caught:
        parse_size(value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200, str(caught.value)


@pytest.mark.parametrize("command", ["train", "lr-find"])
@pytest.mark.parametrize("value", ["1e999", NINES], ids=["1e999", "400-nines"])
def test_cli_memory_budget_out_of_range_is_one_line(tmp_path, command, value):
    out = ["--out", str(tmp_path / "runs")] if command == "train" else []
    ran = engine(command, *TINY_TRAIN, "--memory-budget", value, *out, cwd=tmp_path)
    ran.assert_one_line_error("memory size")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_race_memory_budget_of_400_nines_is_one_line(tmp_path):
    ran = engine("race", "--model", "timm:test_resnet", "--weights", "none", "--data", "digits", "--image-size",
                 "32", "--max-per-class", "12", "--budget", "60", "--memory-budget", NINES,
                 "--out", str(tmp_path / "runs"))
    ran.assert_one_line_error("memory size")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("value", [NINES + ":1", "2:" + NINES], ids=["epoch", "stages"])
def test_cli_unfreeze_of_400_nines_is_one_line(tmp_path, value):
    ran = engine("train", *TINY_TRAIN, "--unfreeze", value, "--out", str(tmp_path / "runs"))
    ran.assert_one_line_error("--unfreeze")


@pytest.mark.parametrize("case", ["array-100000-deep", "float-1e999"])
def test_lr_find_config_that_is_hostile_json_is_one_line(tmp_path, case):
    config = tmp_path / "config.json"
    config.write_text(HOSTILE_JSON[case][0])
    ran = engine("lr-find", "--config", str(config), cwd=tmp_path)
    ran.assert_one_line_error("config.json")
