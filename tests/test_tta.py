"""Test-time augmentation (horizontal flip): one engine function (predict.class_probs) behind predict,
evaluate, the CLI and the pages. Real models, real photos, a really trained tiny run; no mocks."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image, ImageOps

from engine.outputs.evaluate import TTAChange, evaluate_run, evaluation_report
from engine.outputs.predict import class_probs, predict_files, predict_images
from tests.conftest import tiny_lfw_run
from tests.test_app import by_label, page
from tests.test_cli import run_cli

TINY = "timm:test_resnet"


def _all_probs(handle, images, tta: bool) -> list[dict[str, float]]:
    """Every class's probability (top-k of all classes), keyed by label."""
    return [{t.label: t.prob for t in topk}
            for topk in predict_images(handle, images, top_k=handle.spec.num_classes, tta=tta)]


def _close(a: dict[str, float], b: dict[str, float], tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < tol


def _photo_256(cat_photo, width: int = 320) -> Image.Image:
    """The cat cropped to ``width`` x 256: efficientnet_lite0's eval transform (resize the shortest
    side to 256, center-crop 224) then leaves even margins, so the mirror of the file and the mirror
    of the crop are the same pixels."""
    photo = Image.open(cat_photo).convert("RGB")
    left, top = (photo.width - width) // 2, (photo.height - 256) // 2
    return photo.crop((left, top, left + width, top + 256))


def test_a_mirror_symmetric_photo_gets_the_same_probabilities_with_tta(default_handle, cat_photo):
    half = _photo_256(cat_photo, width=128)
    symmetric = Image.new("RGB", (256, 256))
    symmetric.paste(half, (0, 0))
    symmetric.paste(ImageOps.mirror(half), (128, 0))
    assert symmetric.tobytes() == ImageOps.mirror(symmetric).tobytes()
    [plain], [tta] = _all_probs(default_handle, [symmetric], False), _all_probs(default_handle, [symmetric], True)
    assert _close(plain, tta)


def test_tta_is_the_mean_of_the_photo_and_its_mirror_file(default_handle, cat_photo, tmp_path):
    photo = _photo_256(cat_photo)
    photo.save(tmp_path / "cat.png")
    ImageOps.mirror(photo).save(tmp_path / "cat-mirrored.png")
    plain, mirrored = predict_files(default_handle, [tmp_path / "cat.png", tmp_path / "cat-mirrored.png"],
                                    top_k=1000)
    [tta] = predict_files(default_handle, [tmp_path / "cat.png"], top_k=1000, tta=True)
    a, b, t = ({x.label: x.prob for x in r.topk} for r in (plain, mirrored, tta))
    assert not _close(a, b, 1e-4), "the cat is not mirror-symmetric: its mirror must predict otherwise"
    assert _close(t, {k: (a[k] + b[k]) / 2 for k in a})
    assert tta.topk[0].index in {281, 282, 283, 284, 285}  # still a cat
    assert abs(sum(t.values()) - 1) < 1e-4  # a distribution


def test_class_probs_returns_both_and_slices_bound_the_forward(default_handle):
    module = default_handle.module
    seen: list[int] = []
    hook = module.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    try:
        x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        plain, none = class_probs(module, x)
        again, tta = class_probs(module, x, tta=True, max_batch=4)
    finally:
        hook.remove()
    assert none is None and seen == [5, 4, 1, 4, 1]  # the images, then their mirrors, in slices of at most 4
    assert torch.allclose(plain, again, atol=1e-5)
    mirror, _ = class_probs(module, x.flip(-1))
    assert torch.allclose(tta, (plain + mirror) / 2, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (tiny model, LFW faces)."""
    return tiny_lfw_run(tmp_path_factory.mktemp("tta-runs"), run_id="20240101-000000-tta")


def test_evaluate_run_with_tta_reports_both_accuracies_and_the_cli_the_change(trained, cat_photo):
    plain = evaluate_run(trained)
    summary = evaluate_run(trained, tta=True)
    change = summary.tta
    assert plain.tta is None and isinstance(change, TTAChange)
    assert change.plain_acc == pytest.approx(plain.val_acc) and change.plain_loss == pytest.approx(plain.val_loss)
    assert summary.val_acc == pytest.approx(change.tta_acc) and summary.val_loss == pytest.approx(change.tta_loss)
    assert change.images == summary.val_images == plain.val_images
    assert change.points == pytest.approx(100 * (change.tta_acc - change.plain_acc), abs=1e-3)
    report = evaluation_report(trained, tta=True)
    assert report.accuracy == pytest.approx(change.tta_acc) and report.tta.tta_acc == pytest.approx(change.tta_acc)
    assert type(summary).from_dict(json.loads(json.dumps(summary.to_dict()))).tta == change

    out = ["--out", str(trained.path.parent)]
    proc = run_cli("eval", trained.run_id, "--tta", *out)
    assert proc.returncode == 0, proc.stderr
    line = re.search(r"TTA: (\d\.\d{3}) -> (\d\.\d{3}) \(([+-]\d+\.\d) points\), loss", proc.stdout)
    assert line, proc.stdout
    assert float(line[1]) == pytest.approx(change.plain_acc, abs=5e-4)
    assert float(line[2]) == pytest.approx(change.tta_acc, abs=5e-4)
    assert float(line[3]) == pytest.approx(change.points, abs=0.05)
    proc = run_cli("eval", trained.run_id, "--tta", "--json", *out)
    assert json.loads(proc.stdout)["tta"]["tta_acc"] == pytest.approx(change.tta_acc)

    proc = run_cli("predict", str(cat_photo), "--run", trained.run_id, "--tta", "--json", "--top-k", "2", *out)
    assert proc.returncode == 0, proc.stderr
    from engine.runs.calibration import run_temperature
    from engine.runs.load import load_run_model

    # predict --run shows the calibrated probabilities: each view's logits divided by the run's temperature
    [expected] = predict_files(load_run_model(trained.path), [cat_photo], top_k=2, tta=True,
                               temperature=run_temperature(trained))
    assert json.loads(proc.stdout)[0]["temperature"] == run_temperature(trained) is not None
    got = json.loads(proc.stdout)[0]["topk"]
    assert [t["label"] for t in got] == [t.label for t in expected.topk]
    assert [t["prob"] for t in got] == pytest.approx([t.prob for t in expected.topk], abs=1e-5)


def test_evaluate_and_inference_pages_with_the_tta_toggle(trained, cat_photo, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    shutil.copytree(trained.path, tmp_path / "runs" / trained.run_id)
    change = evaluate_run(trained, tta=True).tta

    at = page("evaluate.py")
    at.run()
    assert not at.exception, at.exception
    assert not [m for m in at.metric if m.label == "With TTA"]
    by_label(at.toggle, "Test-time augmentation (horizontal flip)").set_value(True).run()
    assert not at.exception, at.exception
    assert by_label(at.metric, "Validation accuracy (best checkpoint)").value == f"{change.plain_acc:.2%}"
    with_tta = by_label(at.metric, "With TTA")
    assert with_tta.value == f"{change.tta_acc:.2%}" and with_tta.proto.delta == f"{change.points:+.1f} points"
    assert any(c.value.startswith(change.line()) for c in at.caption)
    assert any("Confusion matrix" in str(c.proto.spec) for c in at.get("plotly_chart"))

    at = page("inference.py", model="timm:efficientnet_lite0", weights="packaged")
    at.run()
    by_label(at.toggle, "Test-time augmentation (horizontal flip)").set_value(True)
    at.file_uploader[0].set_value([("cat.png", cat_photo.read_bytes(), "image/png")]).run()
    assert not at.exception, at.exception
    title = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    from engine.models.factory import create_model

    [expected] = predict_files(create_model("timm:efficientnet_lite0"), [cat_photo], top_k=5, tta=True)
    assert f"{expected.topk[0].label}: {expected.topk[0].prob:.1%} (with TTA)" in title
