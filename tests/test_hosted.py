"""Hosted mode (a shared Streamlit Community Cloud box): detected, capped, said in the CLI and the app.

Real engine and real data throughout: the caps are checked by starting real trainings and building
real models, with the image cap lowered in-process so the built-in digits exceed it.
"""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.config import TrainConfig
from engine.core import hosting
from engine.core.errors import DataError, EngineError
from engine.core.hosting import LIMITS, HostedLimits, hosted_limits, per_class_that_fits
from engine.models.factory import create_model
from engine.runs.store import create_run, list_runs
from engine.training.loop import fit
from tests.conftest import ROOT
from tests.hostile._cli import TINY_CONFIG, TINY_TRAIN, engine

HOSTED = {"WORKBENCH_HOSTED": "1"}


@pytest.fixture
def hosted(monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    return LIMITS


def test_the_setting_decides_else_the_community_cloud_checkout_folder(monkeypatch):
    monkeypatch.delenv("WORKBENCH_HOSTED", raising=False)
    assert hosted_limits() is None  # this checkout is not under /mount/src
    assert hosted_limits("/mount/src/transfer-workbench/engine/core/hosting.py") == LIMITS
    monkeypatch.setenv("WORKBENCH_HOSTED", "0")
    assert hosted_limits("/mount/src/transfer-workbench/engine/core/hosting.py") is None
    for on in ("1", "true", "Yes", " on "):
        monkeypatch.setenv("WORKBENCH_HOSTED", on)
        assert hosted_limits() == LIMITS


@pytest.mark.parametrize("counts, images, expected", [
    ([500, 500, 10], 300, 145),  # 145 + 145 + 10 = 300
    ([100, 100], 1000, 100),  # everything fits
    ([7, 3], 1, 1),  # never below one per class
])
def test_the_per_class_cap_that_fits(counts, images, expected):
    fits = per_class_that_fits(counts, images)
    assert fits == expected
    assert sum(min(c, fits) for c in counts) <= max(images, len(counts))


@pytest.mark.parametrize("args, field, phrase", [
    (["--epochs", "31"], "epochs", "at most 30 epochs"),
    (["--image-size", "256"], "image_size", "at most 224 px"),
])
def test_the_cli_refuses_settings_over_the_caps_and_writes_nothing(tmp_path, args, field, phrase):
    out = tmp_path / "runs"
    ran = engine("train", *TINY_TRAIN, *args, "--out", str(out), env=HOSTED)
    ran.assert_one_line_error(phrase)
    assert "hosted mode" in ran.err
    assert not out.exists() or not any(out.iterdir())
    fine = engine("train", *TINY_TRAIN, "--epochs", "1", "--out", str(out), "--json", env=HOSTED)
    assert fine.rc == 0, fine.err[-2000:]


def test_a_race_budget_over_the_cap_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    race = ["race", "--model", "timm:test_resnet", "--weights", "none", "--data", "digits", "--image-size", "32",
            "--plans", "fe,full", "--out", str(out)]
    ran = engine(*race, "--budget", str(LIMITS.race_s + 1), env=HOSTED)
    ran.assert_one_line_error(f"a race's budget is at most {LIMITS.race_s} s")
    assert "hosted mode" in ran.err
    assert not out.exists() or not any(out.iterdir())
    assert "races of at most 30 minutes" in LIMITS.lines()


def test_a_model_over_the_size_cap_is_refused_before_it_is_built(hosted):
    with pytest.raises(EngineError, match=r"86\.\d M parameters.*at most 30 M"):
        create_model("timm:vit_base_patch16_224", weights="none")
    assert create_model("timm:test_resnet", weights="none").module is not None  # small ones are fine


def test_a_dataset_over_the_image_cap_is_refused_with_the_per_class_cap_that_fits(hosted, monkeypatch, tmp_path):
    monkeypatch.setattr(hosting, "LIMITS", HostedLimits(images=100))
    config = TrainConfig(**{**TINY_CONFIG, "max_per_class": None, "epochs": 1})
    with pytest.raises(DataError, match=r"at most 100 images; this one would use 1,797\. Set max images per class "
                                        r"to 10 \(--max-per-class 10\)"):
        fit(config, create_run(tmp_path, config.to_dict()))
    capped = TrainConfig(**{**TINY_CONFIG, "max_per_class": 10, "epochs": 1})
    assert fit(capped, create_run(tmp_path, capped.to_dict())).status == "finished"


def test_a_config_read_back_is_not_capped_only_a_start_is(hosted):
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 200})  # e.g. a run imported from a bigger machine
    assert TrainConfig.from_dict(config.to_dict()).epochs == 200
    with pytest.raises(EngineError, match="at most 30 epochs"):
        config.check_hosted()


def test_the_app_says_hosted_mode_and_caps_its_widgets(hosted, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.session_state["active_model"] = "timm:test_resnet"
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = None
    at.run()
    assert not at.exception
    banner = " ".join(w.value for w in at.sidebar.warning)
    assert "runs vanish when this server restarts unless you export them" in banner and "at most 30 epochs" in banner
    at.switch_page("views/training.py").run()
    assert not at.exception
    # the caps are the fields' ranges, said beside a field that leaves them (and Start is blocked)
    next(n for n in at.number_input if n.label == "Epochs").set_value(LIMITS.epochs + 1).run()
    assert any(f"Epochs must be between 1 and {LIMITS.epochs}" in e.value for e in at.error)
    next(n for n in at.number_input if n.label == "Epochs").set_value(LIMITS.epochs)
    next(n for n in at.number_input if n.label == "Image size").set_value(LIMITS.image_size + 16).run()
    assert any(f"Image size must be between 16 and {LIMITS.image_size}" in e.value for e in at.error)
    assert next(b for b in at.button if b.label == "Start training").disabled
    at.switch_page("views/compare.py").run()
    assert not at.exception
    race_budget = next(n for n in at.number_input if n.label == "Budget (seconds)")
    assert race_budget.max == LIMITS.race_s
    at.switch_page("views/runs.py").run()
    assert not at.exception and any("Run bundle (.zip)" in w.value for w in at.warning)
    assert list_runs(tmp_path / "runs") == []


def test_the_served_limits_fit_the_box_and_the_readme_states_them(tmp_path):
    """On a 2.7 GB box the app's share and a training's default budget add up to the box, an upload
    (held in the server's memory while its page has it) stays a small part of it, and the docs say
    so: docs/deploying.md names the values config.toml sets, docs/limits.md the upload limit."""
    import tomllib

    from engine.core.memory import APP_SHARE, detect_budget

    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("2700000000\n")
    box = 2_700_000_000
    budget = detect_budget(None, root=cgroup)
    assert budget.bytes + APP_SHARE == box and "cgroup memory.max 2.70 GB" in budget.source
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["maxUploadSize"] * 2**20 <= 0.05 * box and server["maxMessageSize"] * 2**20 <= 0.05 * box
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    assert f"maxUploadSize = {server['maxUploadSize']}" in deploying and f"maxMessageSize = {server['maxMessageSize']}" in deploying
    assert f"up to {server['maxUploadSize']} MB per upload" in (ROOT / "docs" / "limits.md").read_text()
