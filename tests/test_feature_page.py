"""The Feature space page through AppTest: a pretrained model's map, a run beside its backbone, the
cache (a rerun never embeds again), errors as messages, and the entry point listing the page."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

import engine.lab.feature_map as feature_map
from tests.conftest import ROOT, tiny_lfw_run
from tests.test_app import TINY, by_label, page


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Runs and data of these tests go to a temp folder, never the project's; the page's caches start empty."""
    from ui.cache import model_feature_map, run_feature_maps

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    model_feature_map.clear()
    run_feature_maps.clear()
    return tmp_path


def counted(monkeypatch, name: str) -> list:
    """Count calls of engine.lab.feature_map.<name> (ui.cache imports it at call time)."""
    calls: list = []
    real = getattr(feature_map, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(feature_map, name, wrapper)
    return calls


def draw(at: AppTest) -> AppTest:
    """Press "Draw the map": a first visit computes nothing until asked."""
    assert not charts(at), "a map was computed before anyone asked"
    by_label(at.button, "Draw the map").click().run()
    return at


def charts(at: AppTest) -> list[str]:
    return [str(c.proto.spec) for c in at.get("plotly_chart")]


def test_pretrained_mode_maps_lfw_with_its_score_and_a_rerun_does_not_embed_again(monkeypatch):
    calls = counted(monkeypatch, "model_map")
    at = page("feature_map.py")
    at.session_state["data_ref"] = "lfw"
    at.session_state["fm_size"] = 32
    at.run()
    draw(at)
    assert not at.exception, at.exception
    (chart,) = charts(at)
    assert "pretrained: k-NN accuracy" in chart and "-D features" in chart
    assert '"non-face"' in chart and '"face"' in chart  # one trace (colour) per class
    assert "lfw[" in chart  # the hover names each image
    assert any("k-NN accuracy **" in m.value and "random weights" in m.value for m in at.markdown)
    assert len(calls) == 1
    at.run()
    at.run()
    assert not at.exception and len(charts(at)) == 1
    assert len(calls) == 1, "a rerun recomputed the map"
    by_label(at.number_input, "k (neighbours that vote)").set_value(3).run()
    draw(at)  # another map: asked for again
    assert not at.exception and len(calls) == 2  # a new option is a new key
    from engine.data.decisions import relabel

    relabel("lfw", "lfw[150]", "face")  # a decision about one image (the Evaluate page, or the CLI)
    at.run()
    draw(at)
    assert not at.exception and len(calls) == 3, "a relabelled image kept the map from before the decision"
    at.run()
    assert len(calls) == 3


def test_projection_offers_umap_only_when_it_imports():
    at = page("feature_map.py")
    at.session_state["data_ref"] = "lfw"
    at.session_state["fm_size"] = 32
    at.run()
    projection = by_label(at.radio, "Projection")
    try:
        import umap  # noqa: F401
    except Exception:  # noqa: BLE001
        assert projection.disabled and any("umap-learn" in c.value for c in at.caption)
    else:
        assert not projection.disabled


@pytest.fixture
def tiny_run(isolated_dirs):
    """A finished tiny run in the isolated runs folder."""
    return tiny_lfw_run(isolated_dirs / "runs")


def test_run_mode_shows_pretrained_beside_fine_tuned_with_both_scores(tiny_run, monkeypatch):
    calls = counted(monkeypatch, "run_maps")
    at = page("feature_map.py")
    at.session_state["fm_mode"] = "a run"
    at.run()
    draw(at)
    assert not at.exception, at.exception
    before, after = charts(at)
    assert "pretrained: k-NN accuracy" in before and "after fine-tune: k-NN accuracy" in after
    assert any("Pretrained **" in m.value and "after fine-tune **" in m.value for m in at.markdown)
    at.run()
    assert not at.exception and len(charts(at)) == 2
    assert len(calls) == 1, "a rerun recomputed the maps"


def test_unreadable_data_is_a_message_not_a_traceback(isolated_dirs):
    (isolated_dirs / "data" / "notes" / "only").mkdir(parents=True)
    (isolated_dirs / "data" / "notes" / "only" / "a.jpg").write_bytes(b"not a jpeg")
    at = page("feature_map.py")
    at.session_state["data_ref"] = "folder:notes"
    at.run()
    draw(at)
    assert not at.exception, at.exception
    assert at.error and not charts(at)


def test_a_model_over_the_hosted_caps_is_a_message(monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    at = page("feature_map.py", model="timm:vit_base_patch16_224")
    at.run()
    assert not at.exception, at.exception
    assert any("M parameters" in e.value for e in at.error) and not charts(at)


def test_the_entry_point_lists_the_page():
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.session_state["active_model"] = TINY
    at.session_state["active_weights"] = "none"
    at.session_state["data_ref"] = "lfw"
    at.session_state["fm_size"] = 32
    at.run()
    at.switch_page("views/feature_map.py")
    at.run()
    draw(at)
    assert not at.exception, at.exception
    assert at.title[-1].value == "Feature space"
    assert any("k-NN accuracy" in c for c in charts(at))


def test_selecting_points_shows_their_images():
    """What a click or lasso sends (AppTest has no plotly selection: the browser's message is sent as is)."""
    import json

    at = page("feature_map.py")
    at.session_state["data_ref"] = "lfw"
    at.session_state["fm_size"] = 32
    at.run()
    draw(at)
    assert not at.get("image")
    chart = at.get("plotly_chart")[0].proto
    states = at._tree.get_widget_states()
    picked = states.widgets.add()
    picked.id = chart.id
    points = [{"curve_number": 0, "point_index": 0, "point_number": 0},  # trace 0 is the first class, non-face
              {"curve_number": 1, "point_index": 1, "point_number": 1},  # trace 1: face
              {"curve_number": 1, "point_index": 1, "point_number": 1, "customdata": 10**6}]  # not on the map
    picked.string_value = json.dumps({"selection": {"points": points, "point_indices": [0, 1], "box": [],
                                                    "lasso": []}})
    at._run(states)
    assert not at.exception, at.exception
    captions = [str(img.proto) for img in at.get("image")]
    assert len(captions) == 2, captions
    assert 'caption: "non-face: lfw[' in captions[0] and 'caption: "face: lfw[' in captions[1]
    assert any("2 selected" in c.value for c in at.caption)


def test_another_active_model_starts_from_its_own_image_size():
    at = page("feature_map.py")
    at.session_state["data_ref"] = "lfw"
    at.session_state["fm_size"] = 32
    at.run()
    assert by_label(at.number_input, "Image size (px)").value == 32
    at.session_state["active_model"] = "timm:efficientnet_lite0"
    at.session_state["active_weights"] = "packaged"
    at.session_state["fm_max"] = 20
    at.run()
    assert not at.exception, at.exception
    assert by_label(at.number_input, "Image size (px)").value == 224
