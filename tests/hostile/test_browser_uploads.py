"""Hostile uploads through the served app in a real Chromium: clear lines, the good results kept."""
from __future__ import annotations

import io
import zipfile

from PIL import Image

from tests.test_browser import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    BROWSER,
    _no_exception,
    _wait_ready,
    browser_page,
    served_app,
)

pytestmark = BROWSER


def _thin_png(path):
    Image.new("RGB", (10000, 1), (200, 10, 10)).save(path, format="PNG")


def _truncated_jpeg(path, cat_photo):
    buf = io.BytesIO()
    Image.open(cat_photo).convert("RGB").save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


def _encrypted_zip(path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for c in ("cats", "dogs"):
            png = io.BytesIO()
            Image.new("RGB", (8, 8)).save(png, format="PNG")
            zf.writestr(f"{c}/1.png", png.getvalue())
    data = bytearray(buf.getvalue())
    # set the "encrypted" flag bit in every local and central header
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            data[i + offset] |= 0x01
            start = i + 4
    path.write_bytes(bytes(data))


def test_inference_page_lists_bad_uploads_and_still_predicts_the_good_one(served_app, browser_page, cat_photo,
                                                                          tmp_path):
    page = browser_page
    thin, broken = tmp_path / "thin.png", tmp_path / "broken.jpg"
    _thin_png(thin)
    _truncated_jpeg(broken, cat_photo)
    page.goto(f"{served_app}/inference")
    _wait_ready(page)
    page.get_by_text("Upload one or more images").first.wait_for(timeout=120_000)
    page.locator("input[type='file']").first.set_input_files([str(thin), str(broken), str(cat_photo)])
    page.get_by_text("cat:").first.wait_for(timeout=120_000)  # the good photo's prediction
    page.get_by_text("2 file(s) could not be read").first.wait_for(timeout=60_000)
    _no_exception(page)
    body = page.inner_text("body")
    assert "Traceback" not in body
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "hostile-inference.png"), full_page=True)


def test_training_page_names_the_users_zip_when_it_is_encrypted(served_app, browser_page, tmp_path):
    page = browser_page
    archive = tmp_path / "flowers.zip"
    _encrypted_zip(archive)
    page.goto(f"{served_app}/training")
    _wait_ready(page)
    page.get_by_text("upload a zip").first.click()
    _wait_ready(page)
    page.locator("input[type='file']").first.set_input_files(str(archive))
    message = page.get_by_text("password-protected zips are not supported").first
    message.wait_for(timeout=120_000)
    text = message.inner_text()
    assert "flowers.zip" in text and "/" not in text.replace("cats/1.png", ""), text
    _no_exception(page)
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=str(ARTIFACTS / "hostile-training-zip.png"), full_page=True)
