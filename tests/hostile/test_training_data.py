"""A file that breaks after validation (deleted, truncated, replaced by junk mid-run) never fails
the training: the sample is replaced by another image and the run says which files it lost."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from engine.config import TrainConfig
from engine.runs.events import RunStarted
from engine.runs.store import create_run
from engine.training.loop import fit
from tests.hostile._cli import TINY_CONFIG


def _folder(root):
    for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / c).mkdir(parents=True)
        for i in range(8):
            buf = io.BytesIO()
            Image.new("RGB", (24 + i, 24), colour).save(buf, format="PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())
    return root


BREAKS = {
    "deleted": lambda p: p.unlink(),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "replaced-by-text": lambda p: p.write_text("not an image any more"),
    "replaced-by-huge-claim": lambda p: Image.new("1", (30000, 30000)).save(p, format="PNG"),
}


@pytest.mark.parametrize("how", list(BREAKS), ids=list(BREAKS))
def test_a_file_that_breaks_mid_run_is_replaced_and_reported(tmp_path, how):
    data = _folder(tmp_path / "colours")
    victim = data / "red" / "3.png"
    config = TrainConfig(**{**TINY_CONFIG, "data": str(data), "max_per_class": None, "epochs": 2,
                            "batch_size": 4})
    run = create_run(tmp_path / "runs", config.to_dict())

    def emit(event):
        if isinstance(event, RunStarted):
            BREAKS[how](victim)  # validated a moment ago, broken before its first read

    result = fit(config, run, emit=emit)
    assert result.status == "finished" and result.epochs_done == 2, result.reason
    assert "1 file(s) became unreadable" in result.reason
    status = run.status()
    assert [u["file"] for u in status.unreadable] == ["3.png"]
    assert [m["epoch"] for m in run.metrics()] == [1, 2]


def test_cli_training_names_the_files_the_data_check_skipped(tmp_path):
    from tests.hostile._cli import TINY_TRAIN, engine

    data = _folder(tmp_path / "colours")
    (data / "red" / "junk.png").write_bytes(b"not a png")
    (data / "blue" / "cut.png").write_bytes((data / "blue" / "0.png").read_bytes()[:30])
    args = [a for a in TINY_TRAIN]
    args[args.index("--data") + 1] = str(data)
    ran = engine("train", *args, "--epochs", "1", "--out", str(tmp_path / "runs"))
    assert ran.rc == 0 and "Traceback" not in ran.err, ran.err[-1500:]
    line = next(ln for ln in ran.err.splitlines() if ln.startswith("skipped 2 file(s)"))
    assert "junk.png" in line and "cut.png" in line
