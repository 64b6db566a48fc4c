"""The "label next" panel (Training page, for a dataset built in the browser): upload unlabelled images,
see the ones a finished run of this dataset is least sure about with its guess, and file each under a
class with one click (engine.lab.active ranks; engine.data.builder checks and stores).

The pool is scored once: the probabilities and features of every image stay in the session, keyed by
the pool's content hash, the run and its best checkpoint, so a rerun (every click is one) only
re-ranks. An image filed under a class leaves the list, and the next pick moves away from it too
(``suggest(labelled=...)``), so the list refills with images unlike those just labelled.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import streamlit as st

from engine.core.errors import EngineError
from engine.core.paths import data_root, runs_root
from engine.data.builder import MARKER, BuiltDataset
from engine.data.images import IMAGE_SUFFIXES
from engine.runs.store import RunDir, list_runs
from ui.errors import show_error
from ui.text import md
from ui.uploads import upload_help, upload_limit_mb

SCORED = "label_next_scored"  # {"key": (pool hash, run path, mtime), "scores": PoolScores, "done": set[int]}
FLASH = "label_next_flash"  # (kind, text) from the last click, shown after its rerun
MOST = 24  # suggestions shown at most
MAX_UPLOADS = 1000  # images scored from one upload; the engine's own bound is higher (a CLI pool)
_TYPES = sorted({s.lstrip(".") for s in IMAGE_SUFFIXES})


def built_dataset_of(source: str | None) -> BuiltDataset | None:
    """The builder's dataset ``source`` is (a folder directly in the data folder with the builder's
    marker), else None: other data is not changed from the app."""
    if not source:
        return None
    path = Path(source)
    try:
        if path.parent.resolve() != data_root().resolve() or not (path / MARKER).is_file():
            return None
        return BuiltDataset.open(path.name)
    except (OSError, EngineError):
        return None


def runs_on(folder: Path) -> list[RunDir]:
    """Finished runs with a best checkpoint that trained on ``folder``, newest first."""
    want = os.path.realpath(folder)
    out = []
    for run in list_runs(runs_root()):
        data = run.config_or_empty().get("data")
        if (isinstance(data, str) and data.strip() and os.path.realpath(data) == want
                and run.status().state == "finished" and run.checkpoint("best").is_file()):
            out.append(run)
    return out


def pool_key(pool: list[tuple[str, bytes]]) -> str:
    """A hash of the pool's names and bytes: the same upload again is the same pool."""
    digest = hashlib.sha256()
    for name, data in pool:
        digest.update(hashlib.sha256(name.encode("utf-8", "replace")).digest())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def _scored(run: RunDir, pool: list[tuple[str, bytes]]) -> dict:
    """The session's scores of this pool under this run, computed when the pool or the run changed."""
    from engine.lab.active import score_pool
    from engine.runs.calibration import run_temperature
    from ui.cache import load_trained

    mtime = run.checkpoint("best").stat().st_mtime
    key = (pool_key(pool), str(run.path), mtime)
    kept = st.session_state.get(SCORED)
    if kept is None or kept["key"] != key:
        handle = load_trained(str(run.path), mtime)
        with st.spinner(f"Scoring {len(pool)} images with run {run.run_id}..."):
            scores = score_pool(handle, pool, temperature=run_temperature(run), preview=96)
        kept = {"key": key, "scores": scores, "done": set()}
        st.session_state[SCORED] = kept  # one pool per session: a new upload replaces the last
    return kept


def _file(ds: BuiltDataset, cls: str, name: str, data: bytes, position: int, done: set[int]) -> None:
    """File one pool image under ``cls`` with the builder's checks; it leaves the list either way
    (added, already there, or refused with the reason said)."""
    try:
        result = ds.add_images(cls, [(name, data)])
    except EngineError as exc:
        st.session_state[FLASH] = ("error", md(str(exc)))
        return
    done.add(position)
    if result.refused:
        st.session_state[FLASH] = ("error", f"{md(name)} not added: {md(result.refused[0][1])}")
    else:
        st.session_state[FLASH] = ("success", f"{md(name)} → {md(cls)}: {md(result.summary())}.")


def label_next(source: str | None) -> None:
    """The panel, drawn only for a built dataset; without a finished run on it, says what to do first."""
    ds = built_dataset_of(source)
    if ds is None:
        return
    st.subheader("4. Label next")
    runs = runs_on(ds.root)
    if not runs:
        st.caption(f"Train a run on {md(ds.name)} first: then upload unlabelled images here, and the run "
                   "picks the ones it is least sure about for you to label.")
        return
    ids = [r.run_id for r in runs]
    left, right = st.columns([3, 1])
    run = runs[ids.index(left.selectbox("Suggest with run", ids, key="ln_run",
                                        help="finished runs on this dataset, newest first"))]
    top = right.number_input("Suggestions", 1, MOST, 8, key="ln_top")
    files = st.file_uploader("Unlabelled images", type=_TYPES, accept_multiple_files=True, key="ln_pool",
                             max_upload_size=upload_limit_mb(), help=upload_help())
    if not files:
        st.caption("Upload unlabelled images: the run lists those it is least sure about (the smallest gap "
                   "between its two likeliest classes), spread over different-looking images; a click on a "
                   "class adds one to the dataset.")
        return
    if len(files) > MAX_UPLOADS:
        st.error(f"{len(files):,} images: at most {MAX_UPLOADS:,} are scored at once here.")
        return
    pool = [(f.name, f.getvalue()) for f in files]
    try:
        kept = _scored(run, pool)
    except EngineError as exc:
        show_error(exc)
        return
    _panel(ds, run, pool, kept, int(top))


def _panel(ds: BuiltDataset, run: RunDir, pool: list[tuple[str, bytes]], kept: dict, top: int) -> None:
    from engine.lab.active import suggest

    scores, done = kept["scores"], kept["done"]
    flash = st.session_state.pop(FLASH, None)
    if flash:
        getattr(st, flash[0])(flash[1])
    rows = {pos: row for row, pos in enumerate(scores.positions)}
    from ui.cache import open_set_rule

    picks = suggest(scores, top, labelled=[rows[p] for p in done if p in rows],
                    open_set=open_set_rule(run, len(scores.class_names)))  # read once per fit, not per click
    left = len(scores.names) - len([p for p in done if p in rows])
    st.caption(f"Run {md(run.run_id)} on {len(scores.names)} images ({left} not labelled yet)"
               + (", calibrated probabilities" if scores.temperature is not None else "")
               + ": most informative first. Uncertainty is 1 − (p1 − p2), 1 the least sure.")
    if scores.unreadable:
        with st.expander(f"{len(scores.unreadable)} file(s) not scored"):
            for name, why in scores.unreadable:
                st.caption(f"{md(name)}: {md(why)}")
    if not picks:
        st.success("Every readable image of this pool is labelled: upload more, or train again with them.")
        return
    classes = list(ds.classes())
    for s in picks:
        with st.container(border=True):
            image, text = st.columns([1, 4])
            preview = scores.previews[rows[s.index]] if scores.previews else None
            if preview is not None:
                image.image(preview, width=96)
            text.markdown(f"**{md(s.path)}** · guess **{md(s.predicted)}** ({s.probability:.0%}), else "
                          f"{md(s.runner_up)} · uncertainty {s.score:.2f}"
                          + (" · *looks like none of the classes*" if s.unknown else ""))
            buttons = text.columns(max(1, min(len(classes), 6)))
            for i, cls in enumerate(classes):
                if buttons[i % len(buttons)].button(md(cls), key=f"ln-{s.index}-{cls}",
                                                    help=f"add {md(s.path)} to class {md(cls)}"):
                    _file(ds, cls, *pool[s.index], s.index, done)
                    st.rerun()
