"""Text that came from a file, an upload or a run, made safe to show: the one place that escapes it.

Class names, labels, status reasons, file names, run ids and model names from bundles are written by
whoever made the file. Streamlit renders markdown in st.markdown, st.caption, st.success/info/warning/
error, progress texts, widget labels and help tooltips (links, images, emphasis, LaTeX, ``:red[...]``
colour directives); Plotly renders a subset of HTML in titles, tick labels, legends and hover labels
(``<a href>``, ``<b>``, ``<br>``). Such a string must arrive as the characters it holds, never as a link
or markup someone else chose, so every page passes it through one of these helpers:

- ``md``: for anything Streamlit renders as markdown;
- ``code``: the same, shown as inline code (run ids, file names), whatever backticks it holds;
- ``plot``: for Plotly text (titles, categories, legends, hover);
- ``html``: for an HTML context (``unsafe_allow_html``, which the app does not use for such text).
"""
from __future__ import annotations

import html as _html
import re
from typing import Any

# The characters that start markdown or Streamlit syntax in the middle of a line: emphasis and code
# (* _ `), links, images and Streamlit's :colour[...] directives ([ ]), raw HTML, autolinks and entities
# (< > &), headings (#), tables (|), strikethrough (~), LaTeX ($) and GFM's e-mail autolinks (@). Each is
# backslash-escaped (CommonMark: an escaped ASCII punctuation
# character stands for itself). Quotes, commas, dots and brackets are left as they are: harmless mid-line,
# and a message's own punctuation stays readable in its source.
MARKDOWN_SPECIAL = frozenset("\\`*_[]<>&#|~$@")
_LINE_START = re.compile(r"^(\s*)([-+=]|\d+[.)])")  # a list item or a setext underline at the start
_WWW = re.compile(r"(?i)(www)\.")  # a GFM autolink literal: www.example.com
# a colon that starts a URL (https://) or a shortcode (:smile:, :material/home:); "a.zip: unreadable" or
# "10000:1" keep theirs
_COLON = re.compile(r":(?=//|[\w/+-]+:)")
_LINE_BREAKS = re.compile(r"[\r\n\t\f\v\u2028\u2029\x85]+")
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def one_line(value: Any) -> str:
    """``value`` as one printable line: a newline can start a heading, a list or a table in markdown,
    and a control character can hide what follows it."""
    return _INVISIBLE.sub("", _LINE_BREAKS.sub(" ", str(value)))


def md(value: Any) -> str:
    """``value`` for any Streamlit element that renders markdown: shown exactly as written, on one line."""
    text = "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in one_line(value))
    text = _COLON.sub(r"\\:", _WWW.sub(r"\1\\.", text))
    return _LINE_START.sub(lambda m: m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1], text)


def code(value: Any) -> str:
    """``value`` as inline code in markdown (nothing inside code is interpreted): fenced with one more
    backtick than the longest run of backticks it holds, padded when it starts or ends with one."""
    text = one_line(value)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plot(value: Any) -> str:
    """``value`` for Plotly text (titles, axis categories, legend entries, hover labels): its pseudo-HTML
    is escaped (``<`` ``>`` ``&``), so ``<a href=...>`` or ``<br>`` are shown, not followed or obeyed."""
    return _html.escape(one_line(value), quote=False)


def html(value: Any) -> str:
    """``value`` for an HTML context: every markup character escaped, quotes included."""
    return _html.escape(str(value), quote=True)


def plot_labels(values: list[Any]) -> list[str]:
    """Category labels for a Plotly axis or legend, escaped and kept distinct: two names that escape to
    the same text would merge into one bar, so a repeat gets a numbered suffix."""
    seen: dict[str, int] = {}
    labels = []
    for value in values:
        label = plot(value)
        if label in seen:
            seen[label] += 1
            label = f"{label} ({seen[label]})"
        else:
            seen[label] = 1
        labels.append(label)
    return labels


MODEL_CHARS = 18  # a legend entry stays about 30 characters
TAIL_CHARS = 8


def short_run_names(runs: list[tuple[str, str | None]]) -> dict[str, str]:
    """Legend names for runs given as (run id, model): the model's short name and the id's last part
    ("test_resnet · 3f9a"), distinct among ``runs``. A full id (20250101-120000-race-feature-3f9a)
    squeezed a chart to a sliver; the full id goes in the hover."""
    names: dict[str, str] = {}
    for run_id, model in runs:
        arch = str(model or "run").rsplit(":", 1)[-1].rsplit("/", 1)[-1][:MODEL_CHARS]
        tail = run_id.rsplit("-", 1)[-1][-TAIL_CHARS:]
        name = f"{arch} · {tail}"
        if name in names.values():  # same model, same tail: the whole id tells them apart
            name = f"{arch} · {run_id}"
        names[run_id] = name
    return names


def imbalance_line(ratio: dict) -> str:
    """The data report's one line on class balance (engine.data.balance.class_imbalance's dict), in
    markdown with the class names escaped. A tie is said as such: "'cat' 8 / 'cat' 8 = 1.0:1" read as a
    comparison of a class with itself."""
    largest, smallest = ratio.get("largest_images"), ratio.get("smallest_images")
    if largest == smallest:
        return f"Balanced: every class has {largest} image{'s' if largest != 1 else ''}."
    return (f"Largest / smallest class: '{md(ratio['largest'])}' {largest} / '{md(ratio['smallest'])}' {smallest} "
            f"= {ratio['ratio']:.1f}:1 (a warning from {ratio['threshold']:g}:1).")
