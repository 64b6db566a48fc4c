"""Every page through Streamlit's AppTest: real engine, tiny models, real data, no browser."""
from __future__ import annotations

import io

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT, tiny_lfw_run

TINY = "timm:test_resnet"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Runs and uploads of app tests go to a temp folder, never the project's."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return tmp_path


def page(name: str, model: str = TINY, weights: str = "none", classes=None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "views" / name), default_timeout=180)
    at.session_state["active_model"] = model
    at.session_state["active_weights"] = weights
    at.session_state["active_num_classes"] = classes
    return at


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def test_entry_point_home_and_sidebar():
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Transfer-learning workbench"
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "timm:efficientnet_lite0" in sidebar and "4,652,008 parameters" in sidebar
    for target in ("views/model_explorer.py", "views/freeze_configurator.py", "views/training.py", "views/inference.py"):
        at.switch_page(target)
        at.run()
        assert not at.exception, target


def test_model_explorer_picks_a_model_and_shows_shapes():
    at = page("model_explorer.py", model="timm:efficientnet_lite0", weights="packaged")
    at.run()
    assert not at.exception
    code = " ".join(c.value for c in at.code)
    assert "torch.Size([1, 1000])" in code and "model(x).shape" in code
    at.text_input[0].set_value("test_resnet").run()
    by_label(at.selectbox, "Model").set_value(TINY)
    by_label(at.radio, "Weights").set_value("none")
    by_label(at.number_input, "Classes (0 keeps the pretrained head)").set_value(3)
    at.button[0].click().run()
    assert not at.exception
    assert at.session_state["active_model"] == TINY and at.session_state["active_num_classes"] == 3
    code = " ".join(c.value for c in at.code)
    assert "torch.Size([1, 3])" in code and "model.fc -> 3 classes" in code
    assert at.dataframe and any("layer4" in str(df.value) for df in at.dataframe)
    by_label(at.selectbox, "Module (expand its children)").set_value("layer4").run()
    assert not at.exception
    assert any("Bottleneck" in c.value or "BasicBlock" in c.value for c in at.code)


def test_model_explorer_hub_offline_shows_a_message_not_a_traceback():
    at = page("model_explorer.py")
    at.run()
    by_label(at.radio, "Weights").set_value("hub")
    at.button[0].click().run()
    assert not at.exception
    assert any("offline" in e.value for e in at.error)
    assert at.session_state["active_weights"] == "none"


def test_freeze_configurator_counts_follow_the_plan():
    at = page("freeze_configurator.py")
    at.run()
    assert not at.exception
    full = by_label(at.metric, "Trainable").value
    by_label(at.radio, "Strategy").set_value("feature-extraction").run()
    head_only = by_label(at.metric, "Trainable").value
    assert int(head_only.replace(",", "")) < int(full.replace(",", ""))
    assert int(by_label(at.metric, "BN layers held fixed").value) > 0
    assert at.session_state["freeze_plan"]["strategy"] == "feature-extraction"
    by_label(at.radio, "Strategy").set_value("last-n").run()
    by_label(at.slider, "Backbone stages that train (from the top)").set_value(1).run()
    last1 = int(by_label(at.metric, "Trainable").value.replace(",", ""))
    assert int(head_only.replace(",", "")) < last1 < int(full.replace(",", ""))


def test_freeze_configurator_advisor_and_bn_gap():
    at = page("freeze_configurator.py", model="timm:efficientnet_lite0", weights="packaged")
    at.run()
    by_label(at.selectbox, "Similar to ImageNet photos?").set_value("different").run()
    assert any("Full fine-tune" in s.value for s in at.success)
    by_label(at.button, "Measure train-vs-eval feature difference").click().run()
    assert not at.exception
    assert int(by_label(at.metric, "BatchNorm layers").value) > 10
    by_label(at.selectbox, "Similar to ImageNet photos?").set_value("estimate from data").run()
    by_label(at.radio, "Data").set_value("lfw faces (built-in)").run()  # the one data picker, the session's pick
    assert at.session_state["data_ref"] == "lfw"
    assert by_label(at.number_input, "Classes").value == 2  # the advisor counts the data picked
    by_label(at.button, "Estimate similarity (linear probe on frozen features)").click().run()
    assert not at.exception
    assert any("Feature extraction" in s.value for s in at.success)


def test_training_page_runs_a_tiny_training_to_completion(isolated_dirs):
    at = page("training.py")
    at.session_state["freeze_plan"] = {"strategy": "full", "head_lr": 0.003, "backbone_lr_ratio": 1.0}
    at.run()
    assert not at.exception
    by_label(at.radio, "Data").set_value("lfw faces (built-in)").run()
    assert any("200 images" in str(c.proto.spec) for c in at.get("plotly_chart"))
    by_label(at.number_input, "Image size").set_value(32)
    by_label(at.number_input, "Max images per class (0: all)").set_value(10)
    by_label(at.number_input, "Epochs").set_value(2)
    by_label(at.text_input, "Memory budget").set_value("lots").run()
    # refused beside the setting as soon as it is typed, and Start cannot be pressed: nothing created
    assert not at.exception and any("memory size 'lots'" in e.value for e in at.error)
    assert by_label(at.button, "Start training").disabled
    assert not (isolated_dirs / "runs").is_dir() or not any((isolated_dirs / "runs").iterdir())
    by_label(at.text_input, "Memory budget").set_value("2GB")
    by_label(at.number_input, "Micro-batch (0: automatic)").set_value(4).run()  # a browser reruns on each change
    by_label(at.button, "Start training").click().run()
    assert not at.exception
    run_id = at.session_state["selected_run"]
    assert run_id
    from engine.runs.background import wait_for
    from engine.runs.store import open_run

    status = wait_for(open_run(isolated_dirs / "runs", run_id), timeout_s=240)
    assert status.state == "finished", status
    at.run()
    assert not at.exception
    assert any("Finished" in s.value for s in at.success)
    assert any("8 micro-batches of 4" in c.value for c in at.caption)  # batch 32, slices of 4: shown
    assert len(at.get("plotly_chart")) >= 3  # class balance + loss + accuracy (+ lr)


def test_training_page_reports_bad_zip_and_one_class_data(isolated_dirs):
    at = page("training.py")
    at.run()
    by_label(at.radio, "Data").set_value("upload a zip").run()
    at.file_uploader[0].set_value(("data.zip", b"not a zip at all", "application/zip")).run()
    assert not at.exception
    assert any("not a readable zip" in e.value for e in at.error)
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            img = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(img, format="PNG")
            zf.writestr(f"pets/cat/{i}.png", img.getvalue())
    at.file_uploader[0].set_value(("pets.zip", buf.getvalue(), "application/zip")).run()
    assert not at.exception
    assert any("one class" in e.value for e in at.error)
    assert by_label(at.button, "Start training").disabled


def _png_bytes(photo) -> bytes:
    return photo.read_bytes()


def test_inference_page_predicts_uploads_and_lists_bad_files(cat_photo):
    at = page("inference.py", model="timm:efficientnet_lite0", weights="packaged")
    at.run()
    assert not at.exception
    at.file_uploader[0].set_value([
        ("cat.png", _png_bytes(cat_photo), "image/png"),
        ("broken.png", b"\x89PNG nope", "image/png"),
    ]).run()
    assert not at.exception
    titles = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "cat" in titles.lower()
    assert any("could not be read" in w.value for w in at.warning)


@pytest.fixture
def tiny_run(isolated_dirs):
    """A finished tiny run in the isolated runs folder (lfw, misclassifications guaranteed early)."""
    return tiny_lfw_run(isolated_dirs / "runs")


def test_evaluate_page_shows_matrix_metrics_gallery_and_grad_cam(tiny_run):
    at = page("evaluate.py")
    at.run()
    assert not at.exception, at.exception
    assert by_label(at.metric, "Validation accuracy (best checkpoint)").value.endswith("%")
    assert by_label(at.metric, "Balanced accuracy (mean per-class recall)").value.endswith("%")
    assert 0 <= float(by_label(at.metric, "Macro-F1").value) <= 1
    charts = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "Confusion matrix" in charts and "Confidence of right and wrong" in charts
    captions = [str(img.proto) for img in at.get("image")]
    assert any(" → " in c for c in captions), "misclassified gallery"
    assert not any(", layer " in c for c in captions), "Grad-CAM runs when asked, not on the first visit"
    from engine.outputs.evaluate import evaluation_report

    wrong = evaluation_report(tiny_run).misclassified
    picker = next(s for s in at.selectbox if s.label.startswith("Validation image"))
    assert picker.value == wrong[0]["index"], "the first misclassified image is explained by default"
    assert len(picker.options) > len(wrong) and "(wrong)" in picker.options[0]
    by_label(at.button, "Explain with Grad-CAM").click().run()
    assert not at.exception, at.exception
    overlays = [str(img.proto) for img in at.get("image") if ", layer layer" in str(img.proto)]
    assert overlays, "Grad-CAM overlay"
    right = next(k for k, option in enumerate(picker.options) if "(wrong)" not in option)
    next(s for s in at.selectbox if s.label.startswith("Validation image")).select_index(right).run()
    assert not at.exception, at.exception
    again = [str(img.proto) for img in at.get("image") if ", layer layer" in str(img.proto)]
    assert again and again != overlays, "a correctly classified image, picked, is explained in its turn"
    by_label(at.toggle, "Normalise rows (recall per class)").set_value(False).run()
    assert not at.exception


def test_runs_page_exports_with_parity_shows_code_and_deletes(tiny_run):
    at = page("runs.py")
    at.run()
    assert not at.exception
    by_label(at.radio, "Also export as").set_value("onnx").run()
    by_label(at.button, "Export to onnx and check parity").click().run()
    assert not at.exception
    assert any("matches PyTorch" in s.value for s in at.success)
    assert any("def set_trainable" in c.value for c in at.code)
    by_label(at.checkbox, f"Yes, delete {tiny_run.run_id} and its checkpoints").check().run()
    by_label(at.button, "Delete run").click().run()
    assert not at.exception
    assert not tiny_run.path.exists()


def test_compare_default_demo_shows_fine_tuning_ahead(isolated_dirs):
    """The product's central claim, on real data with the real default model: a few minutes on 2 cores."""
    at = page("compare.py", model="timm:efficientnet_lite0", weights="packaged")
    at.run()
    assert not at.exception
    by_label(at.button, "Run the default demo (digits, 96 px, 2 epochs each)").click().run()
    from engine.lab.compare import group_runs
    from engine.runs.background import wait_for

    group = at.session_state["compare_group"]
    try:
        for run in group_runs(isolated_dirs / "runs", group):
            assert wait_for(run, timeout_s=420).state == "finished"
    finally:  # a run still training (a timeout) must not hold the device for the tests after this one
        from tests.browser_support import end_trainings

        end_trainings(isolated_dirs / "runs")
    at.run()
    assert not at.exception
    assert any("full fine-tune" in s.value for s in at.success), [s.value for s in at.success]
    table = at.dataframe[-1].value
    acc = dict(zip(table["strategy"], table["best_val_acc"]))
    assert acc["full fine-tune"] > acc["feature extraction"] + 0.03
    assert acc["full fine-tune"] >= 0.95


def test_training_page_lists_folders_of_the_data_directory(isolated_dirs):
    folder = isolated_dirs / "data" / "shapes"
    for cls, color in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), color).save(folder / cls / f"{i}.png")
    at = page("training.py")
    at.run()
    by_label(at.radio, "Data").set_value("folder in the data directory").run()
    assert not at.exception
    assert by_label(at.selectbox, "Dataset").value == "folder:shapes"
    assert any("8 images" in str(c.proto.spec) for c in at.get("plotly_chart"))
    assert not by_label(at.button, "Start training").disabled


def test_with_the_plan_left_to_the_workbench_the_sidebar_and_the_lr_finder_say_so(isolated_dirs):
    """The toggle makes the session's plan unused at Start: the sidebar says who chooses (on every page)
    and the LR finder does not sweep a plan that will not train."""
    from ui.lr_finder import AUTO_NOTE

    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.session_state["active_model"] = TINY
    at.session_state["active_weights"] = "none"
    at.run()
    at.switch_page("views/training.py").run()
    sweep = by_label(at.button, "Start the sweep")
    assert not sweep.disabled and "chosen at Start" not in " ".join(m.value for m in at.sidebar.markdown)
    by_label(at.toggle, "Let the workbench choose the plan").set_value(True).run()
    assert not at.exception
    assert by_label(at.button, "Start the sweep").disabled
    assert any(AUTO_NOTE == i.value for i in at.info)
    assert "chosen at Start" in " ".join(m.value for m in at.sidebar.markdown)
    assert any(c.value.startswith("yours, used with that toggle off: `") for c in at.sidebar.caption)
    at.switch_page("views/model_explorer.py").run()  # kept across pages, as the toggle itself is
    assert not at.exception and "chosen at Start" in " ".join(m.value for m in at.sidebar.markdown)
    at.switch_page("views/training.py").run()
    by_label(at.toggle, "Let the workbench choose the plan").set_value(False).run()
    assert not by_label(at.button, "Start the sweep").disabled
    assert "chosen at Start" not in " ".join(m.value for m in at.sidebar.markdown)


def test_training_page_lets_the_workbench_choose_the_plan_and_says_which(isolated_dirs):
    at = page("training.py")
    at.run()
    by_label(at.radio, "Data").set_value("lfw faces (built-in)").run()
    by_label(at.number_input, "Image size").set_value(32)
    by_label(at.number_input, "Max images per class (0: all)").set_value(12)
    by_label(at.toggle, "Let the workbench choose the plan").set_value(True).run()
    assert not at.exception
    assert any("The plan is chosen at Start" in c.value for c in at.caption)
    # progressive resizing is said with what a chosen plan on cached features does instead
    epochs = by_label(at.number_input, "Epochs").value
    by_label(at.number_input, "Image size").set_value(224)
    by_label(at.number_input, "Epochs").set_value(3).run()
    grows = next(c.value for c in at.caption if c.value.startswith("Progressive resizing:"))
    assert "train at 128" in grows and "trains on cached features" in grows and "image size" in grows
    by_label(at.number_input, "Image size").set_value(32)
    by_label(at.number_input, "Epochs").set_value(epochs).run()
    by_label(at.button, "Start training").click().run()
    assert not at.exception
    from engine.runs.background import wait_for
    from engine.runs.store import open_run

    run = open_run(isolated_dirs / "runs", at.session_state["selected_run"])
    assert wait_for(run, timeout_s=240).state == "finished"
    record = run.config()["auto_plan"]
    assert record["status"] == "chosen" and run.config()["plan"] == record["plan"]
    at.run()
    line = next(c.value for c in at.caption if c.value.startswith("Plan chosen for this data"))
    assert record["why"] in line
