"""Compare, evaluation, Grad-CAM, export and generated code, on real tiny runs."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.freeze.plan import FreezePlan
from engine.lab.compare import comparison_table, create_comparison, curves, group_runs, list_groups
from engine.models.factory import create_model
from engine.outputs.evaluate import EvaluationReport, evaluation_report
from engine.runs.store import create_run
from engine.training.loop import fit
from engine.training.run import train_run

TINY = dict(model="timm:test_resnet", weights="none", data="lfw", image_size=32, batch_size=16,
            max_per_class=16, num_workers=0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = TrainConfig(**TINY, epochs=2, plan=FreezePlan.full(head_lr=3e-3).to_dict())
    run = create_run(root, config.to_dict())
    fit(config, run)
    return run


def test_comparison_trains_same_data_and_budget_and_tables(tmp_path):
    base = TrainConfig(**TINY, epochs=2)
    plans = {"feature extraction": FreezePlan.feature_extraction(head_lr=5e-2), "full fine-tune": FreezePlan.full()}
    runs = create_comparison(tmp_path, base, plans)
    group = runs[0].config()["group"]
    assert list_groups(tmp_path) == [group]
    for run in group_runs(tmp_path, group):
        train_run(run)
    configs = [r.config() for r in runs]
    for key in ("data", "split_seed", "seed", "epochs", "batch_size", "image_size", "max_per_class"):
        assert configs[0][key] == configs[1][key]
    rows = comparison_table(group_runs(tmp_path, group))
    assert [r["strategy"] for r in rows] == ["feature extraction", "full fine-tune"]
    assert all(r["state"] == "finished" and r["epochs"] == 2 for r in rows)
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    points = curves(group_runs(tmp_path, group))
    assert {p["strategy"] for p in points} == set(plans) and all(p["elapsed_s"] > 0 for p in points)
    with pytest.raises(EngineError):
        create_comparison(tmp_path, base, {"one": FreezePlan.full()})


def test_a_comparison_checks_every_plan_and_the_data_before_writing_a_run(tmp_path):
    """A bad later plan was found after the first had trained; unknown data left runs behind."""
    from dataclasses import replace

    from engine.runs.store import list_runs

    base = TrainConfig(**TINY, epochs=1)
    bad = {"full": FreezePlan.full(), "last 999": FreezePlan.last(999)}
    with pytest.raises(EngineError, match="strategy last 999: the model has .* backbone stages"):
        create_comparison(tmp_path, base, bad)
    none = {"fe": FreezePlan.feature_extraction(), "nothing": FreezePlan.custom(stages=())}
    with pytest.raises(EngineError, match="strategy nothing: Nothing to train"):
        create_comparison(tmp_path, base, none)
    with pytest.raises(EngineError, match="Unknown data"):
        create_comparison(tmp_path, replace(base, data=str(tmp_path / "missing")), {"a": FreezePlan.full(),
                                                                                     "b": FreezePlan.last(1)})
    assert list_runs(tmp_path) == []


def test_a_cancelled_comparison_ends_the_runs_still_waiting(tmp_path):
    """They read 'interrupted ... resume it' (queued, with a dead pid) after the group stopped."""
    from engine.cli import main
    from engine.runs.background import request_cancel

    runs = create_comparison(tmp_path, TrainConfig(**TINY, epochs=1),
                             {"fe": FreezePlan.feature_extraction(head_lr=5e-2), "full": FreezePlan.full()})
    request_cancel(runs[0])  # cancelled while it waits for the device
    assert main(["compare", "--group", runs[0].config()["group"], "--out", str(tmp_path), "--json"]) == 0
    assert [r.status().state for r in runs] == ["cancelled", "cancelled"]
    assert "before its turn" in runs[1].status().reason


def test_evaluation_report_is_consistent(trained_run):
    report = evaluation_report(trained_run)
    confusion = np.array(report.confusion)
    assert confusion.shape == (2, 2)
    n = confusion.sum()
    assert report.accuracy == pytest.approx(np.trace(confusion) / n)
    assert [c["support"] for c in report.per_class] == confusion.sum(axis=1).tolist()
    assert len(report.misclassified) == n - np.trace(confusion)
    conf = [m["confidence"] for m in report.misclassified]
    assert conf == sorted(conf, reverse=True)
    assert len(report.confidence["correct"]) + len(report.confidence["wrong"]) == n
    for row in report.per_class:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert EvaluationReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.parametrize("name, layer", [("timm:test_resnet", "layer4"), ("timm:test_vit", "blocks.4"),
                                         ("timm:test_efficientnet", "bn2")])
def test_grad_cam_finds_a_layer_and_makes_a_heatmap(name, layer, cat_photo):
    from engine.data.images import open_image
    from engine.outputs.explain import grad_cam

    torch.manual_seed(0)
    handle = create_model(name, weights="none", num_classes=3)
    before = {n: p.requires_grad for n, p in handle.module.named_parameters()}
    result = grad_cam(handle, open_image(cat_photo), class_index=1)
    assert result.target_layer == layer
    size = handle.spec.input_size[-1]
    assert result.heatmap.shape == (size, size) and result.overlay.size == (size, size)
    assert 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    assert result.class_index == 1 and result.class_name == "class_1"
    assert before == {n: p.requires_grad for n, p in handle.module.named_parameters()}
    with pytest.raises(EngineError):
        grad_cam(handle, open_image(cat_photo), class_index=7)


def test_grad_cam_on_the_pretrained_model_looks_at_the_cat(default_handle, cat_photo):
    from engine.data.images import open_image
    from engine.outputs.explain import grad_cam

    result = grad_cam(default_handle, open_image(cat_photo))
    heat = result.heatmap
    h, w = heat.shape
    center = heat[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()
    border = np.concatenate([heat[: h // 8].ravel(), heat[-h // 8:].ravel()]).mean()
    assert result.class_index in {281, 282, 283, 284, 285} and center > border


def test_exports_load_again_with_parity(tmp_path, trained_run):
    from engine.outputs.export import export_onnx, export_torchscript, weights_bundle
    from engine.runs.load import load_run_model

    handle = load_run_model(trained_run.path)
    ts = export_torchscript(handle, tmp_path / "m.pt")
    assert ts.ok and ts.max_abs_diff <= ts.tolerance
    onnx = export_onnx(handle, tmp_path / "m.onnx")
    assert onnx.ok, onnx
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *handle.spec.input_size)  # a batch size the export never saw
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(handle.module(x).numpy() - got).max() < 1e-4
    with zipfile.ZipFile(io.BytesIO(weights_bundle(handle))) as zf:
        zf.extractall(tmp_path / "bundle")
    card = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert card["class_names"] == ["non-face", "face"] and "torch" in card["versions"]
    reloaded = create_model(card["spec"]["name"], weights=tmp_path / "bundle" / "model.safetensors")
    assert reloaded.spec.class_names == ["non-face", "face"]
    assert reloaded.spec.data_config() == handle.spec.data_config()  # the run's size and crop, not the arch's
    card["spec"]["crop_pct"] = "lots"  # an untrusted JSON: a bad value means the architecture's defaults, said
    (tmp_path / "bundle" / "model.json").write_text(json.dumps(card))
    fallback = create_model(card["spec"]["name"], weights=tmp_path / "bundle" / "model.safetensors")
    arch_default = create_model(card["spec"]["name"], weights="none").spec.input_size
    assert fallback.spec.input_size == arch_default != handle.spec.input_size
    assert any("cannot be used" in n for n in fallback.notes)
    with torch.inference_mode():
        assert torch.allclose(reloaded.module(x), handle.module(x))


def test_stage_prefixes_cover_exactly_their_stage():
    from engine.anatomy.stages import model_stages
    from engine.outputs.code import stage_prefixes

    handle = create_model("timm:convnext_atto", weights="none", num_classes=3, check_output=False)
    stages = model_stages(handle.module, handle.spec.head)
    prefixes = stage_prefixes(handle.module, stages)
    for stage in stages:
        covered = {n for n, _ in handle.module.named_parameters()
                   if any(n == p or n.startswith(p + ".") for p in prefixes[stage.name])}
        assert covered == set(stage.params), stage.name
