"""A new user's whole journey in a real Chromium, without a zip or a terminal: build a dataset from
photos, train, clean a wrong label from the evidence, and export a model that predicts the same
outside the app (onnxruntime, from the raw file)."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.browser_support import (
    ARTIFACTS,
    BROWSER,
    _no_exception,
    _wait_ready,
    launch_browser,
    settle,
    start_app,
    stop_app,
)

pytestmark = BROWSER
PER_CLASS = 8


def _photos(folder: Path) -> dict[str, list[Path]]:
    """Real photos from scikit-image's LFW subset (faces, then non-faces), one PNG each, as a user
    would have them in a folder; one non-face is filed with the faces (the label to clean)."""
    from skimage.data import lfw_subset

    images = lfw_subset()
    folder.mkdir()
    out: dict[str, list[Path]] = {"face": [], "non-face": []}
    for cls, start in (("face", 0), ("non-face", 100)):
        for i in range(start, start + PER_CLASS):
            path = folder / f"{cls}-{i}.png"
            Image.fromarray((images[i] * 255).astype("uint8")).resize((64, 64)).save(path)
            out[cls].append(path)
    out["face"].append(out["non-face"].pop())  # the mislabelled photo
    return out


def _uploader(page, label: str):
    return page.locator("[data-testid='stFileUploader']").filter(has_text=label).locator("input[type='file']")


def _number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")
    settle(page)


@pytest.fixture(scope="module")
def fresh_app(tmp_path_factory):
    """The served app on an empty data folder and an empty runs folder: a new user's first visit."""
    tmp = tmp_path_factory.mktemp("journey")
    app = start_app(tmp)
    yield app, tmp
    stop_app(app)


def test_from_nothing_to_a_cleaned_exported_model(fresh_app, tmp_path):
    from playwright.sync_api import sync_playwright

    app, tmp = fresh_app
    photos = _photos(tmp_path / "photos")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(120_000)
        try:
            # 1. a dataset, built in the page: classes by name, photos by upload
            page.goto(f"{app.url}/training")
            _wait_ready(page)
            page.get_by_text("build a dataset here").click()
            page.get_by_label("New dataset name").fill("faces")
            page.get_by_role("button", name="Create dataset").click()
            for cls in photos:
                page.get_by_label("Add a class").fill(cls)
                page.get_by_role("button", name="Add class").click()
                page.get_by_text(f"{cls} · 0 images").wait_for()
                settle(page)
            for cls, files in photos.items():
                _uploader(page, f"Add images to {cls}").set_input_files([str(p) for p in files])
                page.get_by_text(f"{cls}: {len(files)} added").wait_for()
                settle(page)
            page.get_by_text(f"{len(photos['face'])} images", exact=False).first.wait_for()
            _no_exception(page)
            page.screenshot(path=str(ARTIFACTS / "journey-builder.png"), full_page=True)

            # 2. train it (the offline default model, small images), and watch it finish
            _number(page, "Image size", 64)
            _number(page, "Epochs", 3)
            first = _train(page, tmp)
            page.screenshot(path=str(ARTIFACTS / "journey-trained.png"), full_page=True)

            # 3. clean: the ranking by loss leads to the mislabelled photo; excluded, then trained again
            planted = photos["face"][-1].stem
            _clean(page, app.url, planted)
            decisions = json.loads((tmp / "data" / "faces" / "workbench-overrides.json").read_text())
            assert planted in json.dumps(decisions) and "exclude" in json.dumps(decisions)
            assert all(p.read_bytes() for p in (tmp / "data" / "faces").rglob("*.png"))  # files never moved
            page.goto(f"{app.url}/training")
            _wait_ready(page)
            page.get_by_text("build a dataset here").click()
            page.get_by_text("1 excluded", exact=False).first.wait_for()  # the data report honours it
            _number(page, "Image size", 64)
            _number(page, "Epochs", 3)
            run_dir = _train(page, tmp)  # the cleaned run, now selected on every page
            assert run_dir != first

            # 4. export to ONNX from the Runs page, download it, and predict outside the app
            page.goto(f"{app.url}/runs")
            _wait_ready(page)
            page.get_by_role("tab", name="Export").click()
            page.get_by_role("button", name="Export to onnx and check parity").click()
            page.get_by_text("onnx: matches PyTorch").wait_for()
            with page.expect_download() as download:
                page.get_by_role("button", name="Download ONNX + predict_onnx.py (zip)").click()
            package = tmp_path / "onnx.zip"
            download.value.save_as(package)
            _no_exception(page)
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "journey-failure.png"), full_page=True)
            print(_diagnosis(tmp), "\nPAGE:", page.inner_text("body")[-2500:])
            raise
        finally:
            browser.close()
    with zipfile.ZipFile(package) as zf:
        zf.extractall(tmp_path / "onnx")
    script = next((tmp_path / "onnx").rglob("predict_onnx.py"))
    probe = [photos["face"][0], photos["non-face"][0]]
    out = subprocess.run([sys.executable, str(script), *map(str, probe), "--json"], capture_output=True, text=True,
                         timeout=120, cwd=script.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    onnx = json.loads(out.stdout)
    from engine.outputs.predict import predict_files
    from engine.runs.load import load_run_model

    engine = predict_files(load_run_model(run_dir), probe, top_k=2)
    for got, want in zip(onnx, engine):
        assert got["topk"][0]["label"] == want.topk[0].label
        assert abs(got["topk"][0]["prob"] - want.topk[0].prob) < 1e-3


def _train(page, tmp: Path) -> Path:
    """Start training on the page; returns the new run once it finished and its panel says so."""
    import time

    from engine.runs.background import wait_for
    from engine.runs.store import RunDir

    before = set((tmp / "runs").iterdir()) if (tmp / "runs").is_dir() else set()
    page.get_by_role("button", name="Start training").click()
    deadline = time.monotonic() + 60
    while not (new := set((tmp / "runs").iterdir()) - before if (tmp / "runs").is_dir() else set()):
        assert time.monotonic() < deadline, "no run folder appeared"
        time.sleep(0.2)
    run = new.pop()
    assert wait_for(RunDir(run), timeout_s=240).state == "finished"
    page.get_by_text("Finished: completed").wait_for()  # the page's live panel shows it by itself
    _no_exception(page)
    return run


def _diagnosis(tmp: Path) -> str:
    """What a failed journey left: each run's status, the device lock's holder, the app's log tail."""
    import os

    lines = []
    for run in sorted((tmp / "runs").glob("*/status.json")):
        lines.append(f"{run.parent.name}: {run.read_text()[:600]}")
    for lock in Path(os.environ.get("WORKBENCH_LOCKS", "/nonexistent")).glob("*"):
        lines.append(f"lock {lock.name}: {lock.read_text(errors='replace')[:300] if lock.is_file() else ''}")
    log = tmp / "streamlit.log"
    lines.append(log.read_text(errors="replace")[-3000:] if log.is_file() else "no app log")
    return "\n".join(lines)


def _clean(page, url: str, planted: str) -> None:
    """Evaluate: rank every image by loss, check the planted photo leads, and exclude it there."""
    page.goto(f"{url}/evaluate")
    _wait_ready(page)
    page.get_by_role("button", name="Rank the images by loss").click()
    _wait_ready(page)
    captions = [t for t in page.locator("[data-testid='stImageCaption']").all_inner_texts() if " loss " in t]
    order = [c.split(" · ")[0] for c in captions]
    assert any(name.startswith(planted) for name in order[:3]), order  # the wrong label, among the first three
    cell = page.locator("[data-testid='stColumn']").filter(has_text=planted).last
    cell.get_by_role("button", name="Exclude").click()
    page.get_by_text("saved in workbench-overrides.json", exact=False).wait_for()
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "journey-cleaned.png"), full_page=True)
