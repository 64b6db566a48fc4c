"""Text from files is text (issue 26, point 3): class names, labels and reasons written by whoever made
a file reach the pages as the characters they hold, never as a link, an image, raw HTML or markup.

The helper (ui/text.py) is tested on a corpus of markup; then the pages are run (AppTest, real engine,
a tiny model) over a run whose class names come from a labels CSV of that corpus and whose status reason
is the whole corpus, and every markdown body and Plotly figure they send is checked.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from ui.text import MARKDOWN_SPECIAL, code, md, one_line, plot, plot_labels, short_run_names

CORPUS = [
    "[click me](http://evil.example/x)",
    "![pixel](http://evil.example/p.png)",
    '<a href="http://evil.example">link</a>',
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "**bold** and _italic_ and *em*",
    "```python\nprint('fenced')\n```",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "$\\frac{1}{2}$ and $$x^2$$",
    "line one\n# Heading",
    ":red[colour] :material/home: :smile:",
    "<https://evil.example/auto>",
    "www.evil.example and mail@evil.example",
    "~~strike~~ `code` &amp; &lt;b&gt;",
    "1. numbered",
    "- bullet \\*escaped\\*",
]
# class names must be printable (engine.data.layouts.usable_class_name): the corpus without newlines
CLASSES = [s for s in CORPUS if s.isprintable()]


def live(text: str) -> str:
    """The markdown-special characters of ``text`` that are not backslash-escaped, in order (CommonMark:
    a backslash before ASCII punctuation makes it literal, ``\\\\`` is one backslash)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and not text[i + 1].isalnum() and not text[i + 1].isspace():
            i += 2
            continue
        if text[i] in MARKDOWN_SPECIAL:
            out.append(text[i])
        i += 1
    return "".join(out)


def unescape(text: str) -> str:
    """What CommonMark shows for backslash escapes: the character after each backslash."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)


# ------------------------------------------------------------------ the helper


@pytest.mark.parametrize("text", CORPUS)
def test_md_leaves_no_markup_live_and_shows_the_same_characters(text):
    escaped = md(text)
    assert live(escaped) == "", (text, escaped)
    assert unescape(escaped) == one_line(text), "the reader sees what the file holds (on one line)"
    assert "\n" not in escaped
    assert not re.search(r"(?<!\\)\]\(", escaped) and not re.search(r"(?<!\\)<[A-Za-z/!]", escaped)
    assert not re.match(r"\s*([-+*]|\d+[.)])\s", escaped), "no list item at the start"
    assert not re.search(r"(?<!\\)://", escaped) and "www." not in escaped.lower(), "no GFM autolink literal"


@pytest.mark.parametrize("text", CORPUS)
def test_code_shows_the_text_verbatim_inside_a_long_enough_fence(text):
    shown = code(text)
    fence = re.match(r"`+", shown).group(0)
    inner = shown[len(fence):-len(fence)]
    assert shown.endswith(fence) and fence not in inner, "no backtick run inside closes the code span early"
    assert inner.strip() == one_line(text).strip()


@pytest.mark.parametrize("text", CORPUS)
def test_plot_text_has_no_tag_plotly_would_draw(text):
    shown = plot(text)
    assert "<" not in shown and ">" not in shown
    assert shown.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == one_line(text)


def test_plot_labels_stay_distinct_and_unescaped_names_untouched():
    labels = plot_labels(["a<b", "a<b", "cat", "a\nb", "a b"])
    assert labels[:3] == ["a&lt;b", "a&lt;b (2)", "cat"] and len(set(labels)) == 5


def test_short_run_names_are_short_distinct_and_keep_the_model():
    names = short_run_names([("20250101-120000-race-feature-extraction-3f9a", "timm:efficientnet_lite0"),
                             ("20250101-120500-3f9a", "timm:efficientnet_lite0"), ("20250101-1-ab", None)])
    assert names["20250101-120000-race-feature-extraction-3f9a"] == "efficientnet_lite0 · 3f9a"
    assert len(set(names.values())) == 3 and names["20250101-1-ab"] == "run · ab"
    assert max(len(n) for n in list(names.values())[:1]) <= 30


# ------------------------------------------------------------------ the pages


def _picture(rng) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """A tiny run trained on a labels CSV whose labels are the printable corpus (the first class one
    image more: the imbalance line names classes), its status reason then set to the whole corpus."""
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.runs.store import create_run
    from engine.training.loop import fit

    root = tmp_path_factory.mktemp("markup")
    data = root / "data" / "markup"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "label"])
    for c, name in enumerate(CLASSES):
        for i in range(5 if c == 0 else 4):
            _picture(rng).save(data / f"c{c}_{i}.png")
            writer.writerow([f"c{c}_{i}.png", name])
    (data / "labels.csv").write_text(rows.getvalue(), encoding="utf-8")
    # bn_recalibrate off: the running statistics of its few steps, under which the open-set rule calls a cat
    # none of these classes (the inference test's "Not one of: ..." line); measured again, it did not
    config = TrainConfig(model="timm:test_resnet", weights="none", data=str(data), image_size=32, epochs=1,
                         num_workers=0, val_fraction=0.25, plan=FreezePlan.full(head_lr=1e-3).to_dict(),
                         bn_recalibrate="off")
    run = create_run(root / "runs", config.to_dict(), run_id="20990101-000000-markup")
    assert fit(config, run).status == "finished"
    status = json.loads(run.status_path.read_text())
    status["reason"] = "\n".join(CORPUS)
    run.status_path.write_text(json.dumps(status))
    return root, run


@pytest.fixture
def pages(markup_run, monkeypatch):
    root, run = markup_run
    monkeypatch.setenv("WORKBENCH_RUNS", str(root / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(root / "data"))
    return run


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "views" / name), default_timeout=180)
    at.session_state["active_model"] = "timm:test_resnet"
    at.session_state["active_weights"] = "none"
    at.session_state["active_num_classes"] = None
    at.session_state["selected_run"] = "20990101-000000-markup"
    return at


MARKDOWN_KINDS = ("markdown", "caption", "success", "info", "warning", "error")


def _bodies(at: AppTest) -> list[str]:
    """Every body the page sends that Streamlit renders as markdown, widget labels included."""
    bodies = [str(e.value) for kind in MARKDOWN_KINDS for e in getattr(at, kind)]
    for kind in ("selectbox", "button", "checkbox", "radio", "slider", "toggle", "number_input", "text_input"):
        bodies += [str(w.label) for w in getattr(at, kind)]
    return bodies


def _assert_no_live_markup(at: AppTest) -> None:
    """No clickable link, no raw HTML, no corpus string as it was written (unless it escapes to itself)."""
    assert not at.exception, at.exception
    for body in _bodies(at):
        assert not re.search(r"(?<!\\)\]\s*\(", body), body
        assert not re.search(r"(?<!\\)<\s*/?[A-Za-z!]", body), body
        for text in CORPUS:  # each line holding markup, where it appears, is escaped (a backslash before it)
            for line in text.splitlines():
                if any(ch in MARKDOWN_SPECIAL for ch in line):
                    assert not re.search(r"(?<!\\)" + re.escape(line), body), (line, body)


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _plot_strings(figure: dict) -> list[str]:
    """Every string Plotly draws as (pseudo-)HTML: titles, categories, legend names, hover and bar texts."""
    found: list[str] = []

    def walk(value, key=""):
        if isinstance(value, str):
            if key in ("text", "x", "y", "name", "hovertext", "ticktext", "tickvals", "title"):
                found.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    walk(figure)
    return found


def _assert_plots_escaped(at: AppTest, must_show: list[str]) -> str:
    strings = [s for fig in _figures(at) for s in _plot_strings(fig)]
    assert strings, "the page drew no chart"
    for s in strings:
        assert "<" not in s.replace("<extra></extra>", "") and ">" not in s.replace("<extra></extra>", ""), s
    joined = "\n".join(strings)
    for name in must_show:
        assert plot(name) in joined, name
    return joined


def test_training_page_says_the_reason_and_the_labels_as_text(pages):
    at = _page("training.py")
    at.run()
    next(r for r in at.radio if r.label == "Data").set_value("folder in the data directory").run()
    next(s for s in at.selectbox if s.label == "Dataset").set_value("folder:markup").run()
    _assert_no_live_markup(at)
    finished = next(s.value for s in at.success if s.value.startswith("Finished: "))
    assert md("\n".join(CORPUS)) in finished and live(finished.split(". Best val acc")[0]) == ""
    largest = next(c.value for c in at.caption if c.value.startswith("Largest / smallest class"))
    assert f"'{md(CLASSES[0])}' 5" in largest, largest
    _assert_plots_escaped(at, CLASSES)  # the class-count bar chart's categories


def test_inference_chart_title_and_bars_are_text(pages, cat_photo):
    at = _page("inference.py")
    at.run()
    next(r for r in at.radio if r.label == "Predict with").set_value("a trained run").run()
    at.file_uploader[0].set_value(("x.png", Path(cat_photo).read_bytes(), "image/png")).run()
    next(s for s in at.slider if s.label == "Top-k").set_value(len(CLASSES)).run()
    _assert_no_live_markup(at)  # a cat is none of these classes: "Not one of: ..." names them, as text
    said = [m.value for m in at.markdown if "Not one of" in m.value]
    assert len(said) == 1 and said[0].endswith(f"and {len(CLASSES) - 8} more"), said
    next(t for t in at.toggle if "none of the classes" in t.label).set_value(False).run()  # the chart instead
    _assert_no_live_markup(at)
    (figure,) = _figures(at)
    assert figure["layout"]["title"]["text"].split(": ")[0] in [plot(c) for c in CLASSES]
    assert sorted(figure["data"][0]["y"]) == sorted(plot(c) for c in CLASSES), "every class, escaped"


def test_evaluate_matrix_gallery_and_controls_are_text(pages):
    at = _page("evaluate.py")
    at.run()
    _assert_no_live_markup(at)
    _assert_plots_escaped(at, CLASSES)  # the confusion matrix's axes
    heat = next(t for fig in _figures(at) for t in fig["data"] if t.get("type") == "heatmap")
    assert sorted(heat["x"]) == sorted(plot(c) for c in CLASSES)


def test_runs_page_with_markup_in_the_reason(pages):
    at = _page("runs.py")
    at.run()
    _assert_no_live_markup(at)
    table = at.dataframe[0].value
    assert table.loc[table["run_id"] == "20990101-000000-markup", "reason"].iloc[0] == "\n".join(CORPUS), \
        "a table cell is plain text: shown as written"


def test_feature_map_hover_legend_and_captions_are_text(pages):
    at = _page("feature_map.py")
    at.run()
    next(r for r in at.radio if r.label == "Map").set_value("a run").run()
    next(b for b in at.button if b.label == "Draw the map").click().run()
    _assert_no_live_markup(at)
    _assert_plots_escaped(at, CLASSES)


def test_a_damaged_runs_problem_in_the_picker_list_is_text(pages, markup_run, tmp_path, monkeypatch):
    root, run = markup_run
    runs = tmp_path / "runs"
    shutil.copytree(run.path, runs / run.run_id)
    bad = runs / "20000101-000000-bad"
    shutil.copytree(run.path, bad)
    (bad / "best.json").write_text(json.dumps({"class_names": ["[x](http://evil.example)"] * 2}))
    (bad / "best.safetensors").write_bytes(b"[x](http://evil.example) <img src=x onerror=alert(1)>")
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs))
    at = _page("evaluate.py")
    at.run()
    _assert_no_live_markup(at)
    assert any("20000101" in m.value for m in at.markdown), "the damaged run is listed"
