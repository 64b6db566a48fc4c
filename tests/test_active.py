"""Asking for the right labels: a finished run ranks unlabelled images by its uncertainty, keeps
near-copies apart, from the engine, the CLI and the Training page's "label next" panel."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from engine.cli import main
from engine.data.builder import BuiltDataset
from engine.lab.active import pool_files, score_pool, suggest, suggest_labels
from engine.runs.load import load_run_model
from tests.test_app import by_label, page
from ui.text import md


def _digit_pngs(digits: list[int], n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """Real handwritten digits (scikit-learn) as 32 px PNG files, as a user would upload them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for digit in digits:
        for i in [i for i, t in enumerate(d.target) if t == digit][start:start + n]:
            buf = io.BytesIO()
            Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).resize((32, 32)).save(buf, "PNG")
            out.append((f"d{digit}_{i}.png", buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """A built dataset (zero, one: 6 digits each) in a data folder, and a finished tiny run on it."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    home = tmp_path_factory.mktemp("active")
    ds = BuiltDataset.create("dig", home / "data")
    for cls, digit in (("zero", 0), ("one", 1)):
        ds.add_class(cls)
        assert len(ds.add_images(cls, _digit_pngs([digit], 6)).added) == 6
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(ds.root), image_size=32, epochs=1,
                         batch_size=8, num_workers=0, plan=FreezePlan.full(head_lr=1e-3).to_dict())
    run = create_run(home / "runs", config.to_dict())
    assert fit(config, run).status == "finished"
    return home, ds, run


def _pool(folder: Path, files: list[tuple[str, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (folder / name).write_bytes(data)
    return folder


def test_order_is_by_uncertainty_and_copies_of_one_image_are_listed_once(built_run, tmp_path):
    _home, _ds, run = built_run
    handle = load_run_model(run.path)
    distinct = _digit_pngs([0, 1, 2, 7], 3, start=10)  # unseen digits, two of them of unseen classes
    plain = score_pool(handle, distinct)
    by_score = suggest(plain, len(distinct), diversity=0.0)
    scores = [s.score for s in by_score]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1  # the stated score orders the list
    assert all(0.0 <= s <= 1.0 for s in scores)
    p = plain.probs
    top2 = p.topk(2, dim=1).values
    assert by_score[0].score == pytest.approx(float(1 - (top2[:, 0] - top2[:, 1]).min()), abs=1e-6)  # 1 - margin

    doubt_name, doubt = distinct[by_score[0].index]
    copies = [(f"copy{i}_{doubt_name}", doubt) for i in range(4)]
    pool = [*distinct, *copies]  # the most uncertain image five times
    scored = score_pool(handle, pool)
    alone = [s.path for s in suggest(scored, 5, diversity=0.0)]
    assert sum(p.endswith(doubt_name) for p in alone) == 5  # uncertainty alone: five labels on one image
    spread = [s.path for s in suggest(scored, 5)]  # the default diversity
    assert spread[0].endswith(doubt_name)  # the most uncertain still comes first ...
    assert sum(p.endswith(doubt_name) for p in spread) == 1  # ... and once: other images before its copies
    again = [s.path for s in suggest(scored, 4, labelled=[pool.index((doubt_name, doubt))])]
    assert not any(p.endswith(doubt_name) for p in again)  # once labelled, its copies step back too

    report = suggest_labels(run, pool_files(_pool(tmp_path / "pool", distinct)), top=3)
    assert [s.path for s in report.suggestions] == [s.path for s in suggest(plain, 3)]  # files = bytes


def test_cli_data_suggest_prints_json_rows_and_refuses_in_one_line(built_run, tmp_path, capsys):
    home, _ds, run = built_run
    out = ["--out", str(home / "runs")]
    pool = _pool(tmp_path / "pool", _digit_pngs([0, 1, 3], 2, start=20) + [("notes.txt", b"hello"),
                                                                           ("broken.png", b"\x89PNG\r\n\x1a\n")])
    assert main(["data", "suggest", run.run_id, "--pool", str(pool), "--top", "4", "--json", *out]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 4 and all({"path", "predicted", "score"} <= set(r) for r in rows)
    assert all(isinstance(r["unknown"], bool) for r in rows)  # the run's open-set rule marks each one
    assert all(r["predicted"] in ("zero", "one") and 0 <= r["score"] <= 1 for r in rows)
    assert {r["path"] for r in rows} <= {f.name for f in pool.iterdir() if f.suffix == ".png"} - {"broken.png"}
    assert "notes.txt" in captured.err and "broken.png" in captured.err  # skipped, and said so
    assert main(["data", "suggest", run.run_id, "--pool", str(pool), "--top", "2", *out]) == 0
    assert "predicted" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    junk = _pool(tmp_path / "junk", [("a.txt", b"text"), ("b.png", b"not a png")])
    refusals = {
        "run": ["data", "suggest", "no-such-run", "--pool", str(pool), *out],
        "empty": ["data", "suggest", run.run_id, "--pool", str(tmp_path / "empty"), *out],
        "missing": ["data", "suggest", run.run_id, "--pool", str(tmp_path / "nowhere"), *out],
        "junk": ["data", "suggest", run.run_id, "--pool", str(junk), "--json", *out],
        "no pool": ["data", "suggest", run.run_id, *out],
    }
    for what, argv in refusals.items():
        assert main(argv) == 2, what
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: "), what
        assert "Traceback" not in captured.err
    assert main(refusals["junk"]) == 2 and "readable image" in capsys.readouterr().err


def test_training_page_label_next_adds_a_suggested_image_to_the_dataset(built_run, monkeypatch):
    home, ds, run = built_run
    monkeypatch.setenv("WORKBENCH_RUNS", str(home / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(home / "data"))
    at = page("training.py")
    at.session_state["data_ref"] = "built:dig"
    at.run()
    assert not at.exception
    assert by_label(at.selectbox, "Suggest with run").value == run.run_id
    pool = _digit_pngs([0, 1], 3, start=30)
    by_label(at.file_uploader, "Unlabelled images").set_value([(n, b, "image/png") for n, b in pool])
    at.number_input(key="ln_top").set_value(3)
    at.run()
    assert not at.exception
    listed = [b.key for b in at.button if b.key and b.key.startswith("ln-") and b.key.endswith("-one")]
    assert len(listed) == 3
    before = len(ds.classes()["one"])
    first = listed[0]
    position = int(first.split("-")[1])
    scored = at.session_state["label_next_scored"]["scores"]
    at.button(key=first).click().run()
    assert not at.exception
    assert len(ds.classes()["one"]) == before + 1  # the builder stored it
    assert any(md(pool[position][0]) in s.value and "one: 1 added" in s.value for s in at.success)
    now = [b.key for b in at.button if b.key and b.key.startswith("ln-") and b.key.endswith("-one")]
    assert first not in now and len(now) == 3  # gone from the list, which refills
    assert at.session_state["label_next_scored"]["scores"] is scored  # the rerun did not score the pool again


def test_a_suggestion_that_is_none_of_the_classes_says_so(tmp_path):
    """With the run's open-set rule, the list marks an image far from every training image."""
    import torch

    from engine.lab.active import PoolScores, suggest
    from engine.runs.open_set import OpenSetRule

    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    rule = OpenSetRule(bank=bank, labels=torch.tensor([0, 1]), k=1, threshold=0.2)
    pool = PoolScores(names=["near-a", "far"], positions=[0, 1], probs=torch.tensor([[0.6, 0.4], [0.55, 0.45]]),
                      features=torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.0, 1.0]]), class_names=["a", "b"])
    marked = {s.path: s.unknown for s in suggest(pool, 2, open_set=rule)}
    assert marked == {"near-a": False, "far": True}
    assert all(s.unknown is None for s in suggest(pool, 2))
