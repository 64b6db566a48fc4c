"""Pages that survive any run folder (issue 26, point 2) and read well (issue 25, points 8 and 9).

AppTest over real tiny runs (timm test_resnet, 32 px): damaged metrics, status and config files; the
Inference chart at 3 and 20 classes; short legends; delete with its confirmation; the evidence loop's
defaults and where its confirmation appears; the smaller wording points.
"""
from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT, tiny_lfw_run

TINY = "timm:test_resnet"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """One finished tiny LFW run, trained once for the module and copied where a test needs it."""
    return tiny_lfw_run(tmp_path_factory.mktemp("healthy"), run_id="20990101-000000-good")


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return tmp_path


def page(name: str, model: str = TINY, classes: int | None = None, run: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "views" / name), default_timeout=180)
    at.session_state["active_model"] = model
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = classes
    if run:
        at.session_state["selected_run"] = run
    return at


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


# ------------------------------------------------------------------ every page survives any run folder

DAMAGE = {
    "epochs-only": lambda path: (path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n'),
    "strings": lambda path: (path / "metrics.jsonl").write_text(
        '{"epoch": 1, "val_acc": "high", "val_loss": null, "lr": "fast", "epoch_s": "slow"}\n'),
    "status": lambda path: (path / "status.json").write_text("\x00\x01 not json"),
    "config": lambda path: (path / "config.json").write_text('{"epochs": "many", "plan": 7}'),
}


@pytest.fixture
def damaged(dirs, healthy):
    """The healthy run beside four copies, each with one file damaged by hand."""
    runs = dirs / "runs"
    shutil.copytree(healthy.path, runs / healthy.run_id)
    for i, (name, damage) in enumerate(DAMAGE.items()):
        target = runs / f"2099010{i + 2}-000000-{name}"
        shutil.copytree(healthy.path, target)
        damage(target)
    return runs


def test_runs_page_renders_picker_and_delete_whatever_the_run_files_hold(damaged):
    at = page("runs.py")
    at.run()
    assert not at.exception, at.exception
    by_label(at.multiselect, "Overlay curves of").set_value(sorted(p.name for p in damaged.iterdir())).run()
    assert not at.exception, at.exception
    not_drawn = next(c.value for c in at.caption if c.value.startswith("Not drawn: "))
    assert "epochs-only" in not_drawn and "strings" in not_drawn and "good" not in not_drawn
    (acc,) = [f for f in figures(at) if f["layout"]["title"]["text"] == "Validation accuracy"]
    assert acc["layout"]["yaxis"]["range"] == [0, 1], "accuracy runs 0..1"
    for run_id in sorted(p.name for p in damaged.iterdir()):
        by_label(at.selectbox, "Run").set_value(run_id).run()
        assert not at.exception, (run_id, at.exception)
        assert any(b.label == "Delete run" for b in at.button), run_id
        assert by_label(at.selectbox, "Run").value == run_id, "each choice is the one shown"
    by_label(at.selectbox, "Run").set_value("20990102-000000-epochs-only").run()
    by_label(at.checkbox, "Yes, delete 20990102-000000-epochs-only and its checkpoints").check().run()
    by_label(at.button, "Delete run").click().run()
    assert not at.exception, at.exception
    assert not (damaged / "20990102-000000-epochs-only").exists()
    assert any("Deleted run" in s.value and "20990102-000000-epochs-only" in s.value for s in at.success)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_training_pages_run_panel_survives_a_damaged_run(damaged, name):
    run_id = next(p.name for p in damaged.iterdir() if p.name.endswith(name))
    at = page("training.py", run=run_id)
    at.run()
    assert not at.exception, at.exception
    texts = " ".join(str(e.value) for kind in ("error", "warning", "success", "info", "caption")
                     for e in getattr(at, kind))
    assert "Traceback" not in texts and "error id" not in texts, texts


def test_a_fragment_that_fails_shows_the_apps_error_box_not_streamlits():
    script = """
import streamlit as st
from ui.errors import safe_fragment

def panel():
    st.write("before")
    raise KeyError("val_loss")

safe_fragment(panel)()
st.write("after the fragment")
"""
    at = AppTest.from_string(script, default_timeout=60)
    at.run()
    assert not at.exception, "the boundary caught it"
    assert any("error id" in e.value for e in at.error)
    assert any("after the fragment" in m.value for m in at.markdown), "the page goes on"


def test_a_fragments_engine_error_is_a_message_and_rerun_still_passes_through():
    script = """
import streamlit as st
from engine.core.errors import EngineError
from ui.errors import safe_fragment

def panel():
    if st.session_state.setdefault("n", 0) == 0:
        st.session_state["n"] = 1
        st.rerun()
    raise EngineError("the [metrics](http://x.example) cannot be read")

safe_fragment(panel)()
"""
    at = AppTest.from_string(script, default_timeout=60)
    at.run()
    assert not at.exception
    assert at.session_state["n"] == 1
    assert [e.value for e in at.error] == ["the \\[metrics\\](http\\://x.example) cannot be read"]


# ------------------------------------------------------------------ readable results


@pytest.mark.parametrize("classes", [3, 20])
def test_inference_chart_names_every_class_at_a_readable_height(dirs, classes, cat_photo):
    at = page("inference.py", classes=classes)
    at.run()
    at.file_uploader[0].set_value(("cat.png", cat_photo.read_bytes(), "image/png")).run()
    by_label(at.slider, "Top-k").set_value(classes).run()
    assert not at.exception, at.exception
    (fig,) = figures(at)
    bars, layout = fig["data"][0], fig["layout"]
    assert len(bars["y"]) == classes and len(set(bars["y"])) == classes
    assert layout["yaxis"]["tickvals"] == bars["y"], "every bar has its tick label"
    assert layout["height"] >= 100 + 25 * classes, "taller with more classes"
    assert bars["x"] == sorted(bars["x"], reverse=True) and layout["yaxis"]["autorange"] == "reversed"
    assert layout["title"]["text"].startswith(f"{bars['y'][0]}: "), "the title names the winner, drawn on top"
    assert all(t.endswith("%") for t in bars["text"]), "each bar says its probability"


def test_runs_legends_use_short_names_with_the_full_id_on_hover(dirs, healthy):
    runs = dirs / "runs"
    long_id = "20990101-000000-race-feature-extraction-3f9a"
    shutil.copytree(healthy.path, runs / long_id)
    at = page("runs.py")
    at.run()
    assert not at.exception, at.exception
    acc = next(f for f in figures(at) if f["layout"]["title"]["text"] == "Validation accuracy")
    (trace,) = acc["data"]
    assert trace["name"] == "test_resnet · 3f9a"
    assert long_id in json.dumps(trace["customdata"]) and "run id" in trace["hovertemplate"]


def test_runs_table_formats_best_val_acc_and_gives_the_reason_room(dirs, healthy):
    shutil.copytree(healthy.path, dirs / "runs" / healthy.run_id)
    at = page("runs.py")
    at.run()
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["reason"]["width"] == "large"
    shown = at.dataframe[0].value
    assert all(re.fullmatch(r"\d\.\d{4}|", v) for v in shown["best_val_acc"]), list(shown["best_val_acc"])
    assert "None" not in shown.astype(str).to_string()  # a cell with no value is empty, not "None"


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """A tiny run on 10 digit classes: a mistake's predicted class is rarely the first other class."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    root = tmp_path_factory.mktemp("digits")
    config = TrainConfig(model=TINY, weights="none", data="digits", image_size=32, max_per_class=6, epochs=1,
                         num_workers=0, plan=FreezePlan.full(head_lr=1e-3).to_dict())
    run = create_run(root, config.to_dict(), run_id="20990101-000000-digits")
    assert fit(config, run).status == "finished"
    return run


def test_relabel_defaults_to_the_predicted_class_and_confirms_beside_the_button(dirs, ten_classes):
    from engine.outputs.evaluate import evaluation_report

    shutil.copytree(ten_classes.path, dirs / "runs" / ten_classes.run_id)
    wrong = evaluation_report(ten_classes).misclassified
    at = page("evaluate.py")
    at.run()
    assert not at.exception, at.exception
    boxes = [s for s in at.selectbox if s.label == "Relabel as"]
    assert boxes and len(boxes) == min(24, len(wrong))
    assert [b.value for b in boxes] == [m["predicted"] for m in wrong[: len(boxes)]]
    assert any(m["predicted"] != sorted(set(n for n in map(str, range(10))) - {m["true"]})[0] for m in wrong), \
        "at least one mistake where the first other class is not the prediction"
    key = boxes[0].key.removesuffix("-to")
    by_label([b for b in at.button if b.key == f"{key}-exclude"], "Exclude").click().run()
    assert not at.exception, at.exception
    column = next(c for c in at.columns if any(b.key == f"{key}-restore" for b in c.button))
    assert any("saved in" in s.value for s in column.success), "the confirmation sits under the button clicked"
    assert not any("saved in" in s.value for s in at.main.success if s not in column.success)


# ------------------------------------------------------------------ smaller points


def _folder(root, counts: dict[str, int]):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(root / name / f"{i}.png")


def test_a_tie_is_said_as_balanced(dirs):
    _folder(dirs / "data" / "shapes", {"cat": 8, "dog": 8, "owl": 8})
    at = page("training.py")
    at.run()
    by_label(at.radio, "Data").set_value("folder in the data directory").run()
    by_label(at.selectbox, "Dataset").set_value("folder:shapes").run()
    assert not at.exception, at.exception
    captions = [c.value for c in at.caption]
    assert "Balanced: every class has 8 images." in captions and not any("1.0:1" in c for c in captions)


def test_a_class_name_differing_only_by_case_is_named_as_spelled(dirs):
    from engine.data.builder import BuiltDataset

    ds = BuiltDataset.create("pets", root=dirs / "data")
    ds.add_class("cat")
    ds.add_images("cat", [("a.png", _png())])
    at = AppTest.from_file(str(ROOT / "views" / "training.py"), default_timeout=180)
    at.session_state["builder_dataset"] = "pets"
    at.run()
    by_label(at.radio, "Data").set_value("build a dataset here").run()
    by_label(at.text_input, "Add a class").input("Cat")
    by_label(at.button, "Add class").click().run()
    assert not at.exception, at.exception
    (error,) = [e.value for e in at.error if e.value.startswith("There is already")]
    assert error.startswith("There is already a class named 'cat': 'Cat' differs from it only by case"), error
    assert sorted(BuiltDataset.open("pets", root=dirs / "data").classes()) == ["cat"]


def test_the_builders_uploader_states_the_builders_limit(dirs):
    from engine.data.builder import BuiltDataset

    BuiltDataset.create("pets", root=dirs / "data").add_class("cat")
    at = AppTest.from_file(str(ROOT / "views" / "training.py"), default_timeout=180)
    at.session_state["builder_dataset"] = "pets"
    at.run()
    by_label(at.radio, "Data").set_value("build a dataset here").run()
    uploader = next(u for u in at.get("file_uploader") if "Add images to" in u.proto.label)
    assert uploader.proto.max_upload_size_mb == 25, "the uploader says 'Limit 25MB per file', the builder's limit"
    assert "up to 25 MB each" in uploader.proto.help


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def test_frozen_stages_say_frozen_and_counts_name_their_head(dirs):
    at = page("freeze_configurator.py")
    at.run()
    by_label(at.radio, "Strategy").set_value("feature-extraction").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert "nan" not in " ".join(map(str, table["lr"])) and (table["lr"] == "frozen").sum() >= 1
    counted = "Classes the head is counted for (0: the pretrained head)"
    assert by_label(at.number_input, counted).value == 10, "the session's data (digits) has 10 classes"
    assert any("a new 10-class head (your data's, digits)" in c.value for c in at.caption)
    assert int(by_label(at.metric, "Trainable").value.replace(",", "")) == 96 * 10 + 10
    by_label(at.number_input, counted).set_value(0).run()
    assert any("the pretrained 1000-class head" in c.value for c in at.caption)
    assert int(by_label(at.metric, "Trainable").value.replace(",", "")) == 96 * 1000 + 1000
    by_label(at.number_input, counted).set_value(3).run()
    assert not at.exception, at.exception
    assert int(by_label(at.metric, "Trainable").value.replace(",", "")) == 96 * 3 + 3
    assert any("a new 3-class head" in c.value for c in at.caption)


def test_the_feature_map_says_the_k_it_used_and_why(dirs, healthy):
    shutil.copytree(healthy.path, dirs / "runs" / healthy.run_id)
    at = page("feature_map.py")
    at.run()
    by_label(at.radio, "Map").set_value("a run").run()
    by_label(at.button, "Draw the map").click().run()
    assert not at.exception, at.exception
    line = next(c.value for c in at.caption if " vote" in c.value)
    used = int(re.search(r"(\d+) neighbours? votes?", line).group(1))
    assert used < 5 and "not the 5 asked for" in line and "smallest class has" in line
    assert (f"{used} neighbour votes" if used == 1 else f"{used} neighbours vote") in line


def test_the_exported_script_names_the_data_relative_to_the_data_folder(dirs):
    from engine.config import TrainConfig
    from engine.outputs.code import generate_script

    _folder(dirs / "data" / "shapes", {"cat": 2, "dog": 2})
    config = TrainConfig(model=TINY, weights="none", data=str(dirs / "data" / "shapes"), image_size=32)
    script = generate_script(config, ["cat", "dog"], "x")
    assert "DATA = 'shapes'" in script and str(dirs) not in script
    assert "copy it beside this script" in script
    outside = TrainConfig(model=TINY, weights="none", data=str(dirs / "elsewhere"), image_size=32)
    assert f"DATA = '{dirs / 'elsewhere'}'" in generate_script(outside, ["cat", "dog"], "x")
