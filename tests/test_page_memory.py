"""What the pages remember (issue: a new user's first hour): the Training setup survives a visit to
another page and comes back from the URL after a refresh; a URL is untrusted; a setting the engine
refuses is said beside its field and blocks Start, and nothing is written before the settings hold."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from tests.test_app import TINY, by_label


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Runs and data of these tests go to a temp folder, never the project's."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))


def app(query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.session_state["active_model"] = TINY
    at.session_state["active_weights"] = "none"
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at


def _shapes(root) -> None:
    for cls, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200)), ("green", (0, 200, 0))):
        (root / "shapes" / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), colour).save(root / "shapes" / cls / f"{i}.png")


def test_the_training_setup_survives_another_page_and_the_shared_data_follows(tmp_path):
    _shapes(tmp_path / "data")
    at = app()
    at.run()
    at.switch_page("views/training.py").run()
    by_label(at.radio, "Data").set_value("folder in the data directory").run()
    by_label(at.number_input, "Epochs").set_value(4)
    by_label(at.number_input, "Image size").set_value(48)
    by_label(at.selectbox, "Class balance").set_value("weights").run()
    assert not at.exception
    at.switch_page("views/freeze_configurator.py").run()
    assert not at.exception
    # the advisor starts from the data picked on Training, and counts it
    assert by_label(at.selectbox, "Dataset").value == "folder:shapes"
    assert by_label(at.number_input, "Classes").value == 3
    at.switch_page("views/training.py").run()
    assert not at.exception
    assert by_label(at.radio, "Data").value == "folder in the data directory"
    assert by_label(at.selectbox, "Dataset").value == "folder:shapes"
    assert by_label(at.number_input, "Epochs").value == 4
    assert by_label(at.number_input, "Image size").value == 48
    assert by_label(at.selectbox, "Class balance").value == "weights"
    assert at.query_params["data"] in ("folder:shapes", ["folder:shapes"])  # in the URL: a refresh or a link hands it on
    sidebar = " ".join(t.value for t in at.sidebar.text)
    assert "shapes (folder)" in sidebar


def test_a_refresh_restores_the_plan_model_and_data_from_the_url(tmp_path):
    _shapes(tmp_path / "data")
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)  # a new session: nothing set
    for key, value in {"model": TINY, "weights": "none", "data": "folder:shapes", "epochs": "3",
                       "plan": json.dumps({"head_lr": 0.00148, "strategy": "last-n", "last_n": 1})}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.session_state["active_model"] == TINY and at.session_state["active_weights"] == "none"
    plan = at.session_state["freeze_plan"]
    assert plan["head_lr"] == 0.00148 and plan["strategy"] == "last-n" and plan["last_n"] == 1
    at.switch_page("views/training.py").run()
    assert by_label(at.selectbox, "Dataset").value == "folder:shapes"
    assert any("head LR 0.00148" in c.value for c in at.caption)
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "head LR 0.00148" in sidebar


def test_a_hostile_url_is_ignored_not_an_error(tmp_path):
    _shapes(tmp_path / "data")
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    for key, value in {"model": "timm:no_such_model", "weights": "/etc/passwd", "plan": "[" * 1999,
                       "data": "folder:../../etc", "epochs": "1e999", "size": "-5"}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.session_state["active_model"] == "timm:efficientnet_lite0"
    assert at.session_state["active_weights"] == "packaged"
    assert at.session_state["freeze_plan"]["strategy"] == "full"
    at.session_state["active_model"] = TINY
    at.session_state["active_weights"] = "none"
    at.switch_page("views/training.py").run()
    assert not at.exception
    assert any("is not in this app's data folder" in w.value for w in at.warning)  # said, never read
    assert at.session_state["data_ref"] == "folder:shapes"
    assert by_label(at.number_input, "Epochs").value == 1  # 1e999: dropped, the field starts from its default
    assert by_label(at.number_input, "Image size").value == -5  # a number, so the field shows it ...
    assert any("Image size must be between 16" in e.value for e in at.error)  # ... and says why it cannot train
    assert by_label(at.button, "Start training").disabled


def test_a_refused_setting_is_said_beside_it_and_nothing_is_written(tmp_path):
    _shapes(tmp_path / "data")
    at = app({"data": "folder:shapes"})
    at.run()
    at.switch_page("views/training.py").run()
    by_label(at.number_input, "Image size").set_value(8).run()  # the frontend's range never hides a value
    assert any("Image size must be between 16 and 1024 (got 8)" in e.value for e in at.error)
    assert by_label(at.button, "Start training").disabled
    by_label(at.number_input, "Image size").set_value(32)
    by_label(at.number_input, "Max images per class (0: all)").set_value(1).run()
    assert not by_label(at.button, "Start training").disabled  # the split is checked when Start is pressed
    by_label(at.button, "Start training").click().run()
    assert not at.exception
    assert any("No validation images" in e.value for e in at.error)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no failed run left


def test_the_sidebar_shows_the_plan_of_the_click_that_changed_it(tmp_path):
    at = app()
    at.run()
    at.switch_page("views/freeze_configurator.py").run()
    assert "`full`" in " ".join(m.value for m in at.sidebar.markdown)
    by_label(at.radio, "Strategy").set_value("feature-extraction").run()  # one click, one rerun
    assert not at.exception
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "`feature-extraction`" in sidebar and "`full`" not in sidebar


def test_every_number_field_of_the_url_is_guarded_before_streamlit_reads_it(tmp_path):
    """ui.state drops unreadable numbers (1e999) from the URL for the fields it lists; a new number field
    on the Training page must be listed there too, or such a link breaks the page again."""
    from ui.state import NUMERIC_FIELDS

    at = app()
    at.run()
    at.switch_page("views/training.py").run()
    bound = {n.key for n in at.number_input} - {"lr_find_steps"}  # the sweep's field is not in the URL
    assert bound == set(NUMERIC_FIELDS)
