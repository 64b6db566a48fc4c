"""The app under hostile conditions (AppTest): damaged runs, a busy device, corrupt session state.

The promise: a clear message in the page, never a traceback or a server path, and the healthy
runs keep working beside the damaged ones.
"""
from __future__ import annotations

import json
import shutil

import pytest
from streamlit.testing.v1 import AppTest

from engine.config import TrainConfig
from engine.runs.locks import DeviceLock
from engine.runs.store import create_run, open_run
from engine.training.loop import fit
from tests.conftest import ROOT
from tests.hostile._cli import TINY_CONFIG

TINY = dict(TINY_CONFIG, epochs=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(**TINY)
    assert fit(config, create_run(root, config.to_dict(), run_id="20990101-000000-good")).status == "finished"
    return root / "20990101-000000-good"


DAMAGES = {
    "config": lambda r: r.config_path.write_text("{broken"),
    "truncated": lambda r: r.checkpoint("best").write_bytes(r.checkpoint("best").read_bytes()[:500]),
    "status": lambda r: r.status_path.write_text("\x00\x01"),
}


@pytest.fixture
def runs_dir(tmp_path, monkeypatch, trained):
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs / trained.name)
    for i, (name, damage) in enumerate(DAMAGES.items()):
        target = runs / f"2000010{i}-000000-{name}"
        shutil.copytree(trained, target)
        damage(open_run(runs, target.name))
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return runs


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "views" / name), default_timeout=180)
    at.session_state["active_model"] = TINY["model"]
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = None
    return at


def _texts(at: AppTest) -> str:
    parts = [e.value for kind in ("error", "warning", "info", "markdown", "caption", "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _assert_clean(at: AppTest, runs) -> str:
    assert not at.exception, at.exception
    text = _texts(at)
    assert "Traceback" not in text and str(runs) not in text and str(ROOT) not in text, text
    return text


@pytest.mark.parametrize("page", ["evaluate.py", "inference.py"])
def test_pickers_offer_only_healthy_runs_and_name_the_damaged(runs_dir, page):
    at = _page(page)
    if page == "inference.py":
        at.session_state["selected_run"] = "20990101-000000-good"
    at.run()
    text = _assert_clean(at, runs_dir)
    picker = next(s for s in at.selectbox if s.label == "Run")
    # a garbage status.json does not spoil the weights: that run stays usable
    assert [o.split(" ·")[0] for o in picker.options] == ["20990101-000000-good", "20000102-000000-status"]
    assert "damaged" in text.lower() or any("damaged" in e.label for e in at.expander)
    assert "truncated" in text


def test_runs_page_lists_damaged_runs_and_explains_the_selected_one(runs_dir):
    at = _page("runs.py")
    at.run()
    _assert_clean(at, runs_dir)
    table = at.dataframe[0].value
    states = dict(zip(table["run_id"], table["state"]))
    assert states["20990101-000000-good"] == "finished"
    assert states["20000100-000000-config"] == "damaged" and states["20000101-000000-truncated"] == "damaged"
    assert states["20000102-000000-status"] == "unknown"
    next(s for s in at.selectbox if s.label == "Run").set_value("20000101-000000-truncated").run()
    text = _assert_clean(at, runs_dir)
    assert "is damaged" in text and "truncated" in text
    assert any(b.label == "Delete run" for b in at.button)


def test_training_page_with_damaged_runs_still_renders(runs_dir):
    at = _page("training.py")
    at.run()
    _assert_clean(at, runs_dir)
    assert any(b.label == "Start training" for b in at.button)


def test_training_page_says_when_the_device_is_busy_and_that_a_start_joins_the_queue(runs_dir):
    with DeviceLock(None, "cpu", holder="another user's run"):
        at = _page("training.py")
        at.run()
        text = _assert_clean(at, runs_dir)
    assert "is using this machine's device" in text
    assert "waits in the queue (number 1)" in text
    assert not next(b for b in at.button if b.label == "Start training").disabled


@pytest.mark.parametrize("bad_state", [{"freeze_plan": "garbage"}, {"active_num_classes": "ten"}],
                         ids=["plan-not-a-dict", "classes-not-a-number"])
def test_an_unexpected_error_shows_an_error_id_not_a_traceback(runs_dir, bad_state):
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.run()
    for key, value in bad_state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and any("error id" in e for e in errors), errors
    assert all("Traceback" not in e and "File \"" not in e for e in errors)


def test_config_values_out_of_range_are_refused_in_the_app_as_in_the_cli():
    with pytest.raises(Exception) as info:
        TrainConfig(epochs=0)
    assert "epochs must be between 1" in str(info.value)
    assert json.dumps(TrainConfig().to_dict())  # the default is valid and serialisable


def test_compare_page_with_a_damaged_run_still_renders(runs_dir):
    """A run whose config.json is unreadable must not take the comparison list down with it."""
    at = _page("compare.py")
    at.run()
    _assert_clean(at, runs_dir)


def test_a_dead_queued_run_does_not_block_training_for_everyone(runs_dir):
    import json
    import time

    stuck = open_run(runs_dir, "20990101-000000-good")
    stuck.status_path.write_text(json.dumps({"state": "queued", "pid": None, "updated_at": time.time() - 3600}))
    at = _page("training.py")
    at.run()
    text = _assert_clean(at, runs_dir)
    assert "is training" not in text
    assert not next(b for b in at.button if b.label == "Start training").disabled

