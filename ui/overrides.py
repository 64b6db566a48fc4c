"""Deciding about single images where the evidence is (the Evaluate page): relabel, exclude, restore,
undo. The decisions go to the dataset's overrides file (engine.data.overrides); the files stay as
they are, and the run on screen keeps the data it trained with, so its scores do not move under the
person reading them: a decision counts from the next training and data report on.
"""
from __future__ import annotations

from typing import Any, Callable

import streamlit as st

from engine.core.errors import EngineError
from engine.data import decisions as dec
from engine.data import overrides as ov
from ui.errors import public_message, show_error
from ui.text import code, md

APPLIES = ("It applies to the next training and data report; this run keeps the data it trained with, so "
           "its scores here do not change.")
_FLASH = "overrides_flash"  # (key of the control clicked, kind, text): said under that control after the rerun
UNDO = "ov-undo"


def writable(data: str) -> bool:
    """Whether the app may record decisions about ``data``: a built-in set, or data inside the data folder.
    A run imported from elsewhere can name any folder; the app never writes (or reads) outside its data
    folder, so such a run's images are decided on from a terminal (python -m engine data ...)."""
    from engine.core.paths import resolve_data_path
    from engine.data.datasets import BUILTIN, TORCHVISION_SETS

    if data in BUILTIN or data in TORCHVISION_SETS:
        return True
    try:
        resolve_data_path(data)
    except EngineError:
        return False
    return True


def decisions(data: str) -> dict[str, ov.Decision]:
    """The decision that counts per image now ({} when there are none, or the file cannot be read:
    then its message is shown once, here)."""
    if not writable(data):
        st.info("This run's data is outside the data folder (an imported run?): the app does not record "
                "decisions about its images; use python -m engine data on a terminal.")
        return {}
    try:
        return ov.read_overrides(data).state()
    except EngineError as exc:
        show_error(exc)
        return {}


def _decide(key: str, action: Callable[..., Any], *args: str) -> None:
    """Take the decision, then rerun; what it did is said under the control ``key`` (show_flash)."""
    try:
        done = action(*args)
    except EngineError as exc:
        st.session_state[_FLASH] = (key, "error", md(public_message(str(exc))))
    else:
        if done is None:
            text = "Nothing to undo."
        elif action is dec.undo:
            text = f"Undone: {md(done.line())}. {APPLIES}"
        else:
            text = (f"{md(done.line().capitalize())}: saved in {md(ov.overrides_path(args[0]).name)}. "
                    f"{APPLIES}")
        st.session_state[_FLASH] = (key, "success", text)
    st.rerun()


def show_flash(where: Any = st, key: str | None = None) -> None:
    """What the last click did (kept across the rerun the click causes), said beside the control that was
    clicked: ``key`` names it (None: any control's). A confirmation far above the button went unseen."""
    flash = st.session_state.get(_FLASH)
    if not flash or (key is not None and flash[0] != key):
        return
    del st.session_state[_FLASH]
    (where.success if flash[1] == "success" else where.error)(flash[2])


def undo_button(data: str, decided: dict[str, ov.Decision]) -> None:
    """'Undo last change', naming it; nothing when no decision was taken yet."""
    if not writable(data):
        return
    try:
        history = ov.read_overrides(data).decisions
    except EngineError:
        return  # said by ``decisions``
    if history:
        last = history[-1]
        if st.button("Undo last change", key=UNDO, help=f"Takes back: {md(last.line())}"):
            _decide(UNDO, dec.undo, data)
        show_flash(st, UNDO)
        excluded = sum(d.action == "exclude" for d in decided.values())
        st.caption(f"{len(decided) - excluded} image(s) relabelled and {excluded} excluded so far "
                   f"({md(ov.overrides_path(data).name)}); the last change: {md(last.line())}.")


def relabel_default(others: list[str], predicted: str | None) -> int:
    """Where 'Relabel as' starts: the class the model predicted (a 9 read as 8 is most likely an 8), else
    the first other class."""
    return others.index(predicted) if predicted in others else 0


def controls(where: Any, data: str, image: str, given: str, names: list[str],
             decided: dict[str, ov.Decision], key: str, predicted: str | None = None) -> None:
    """Under one thumbnail: the decision taken about it and 'Restore', or 'Relabel as' (starting at the
    ``predicted`` class) and 'Exclude'; what a click did is said here, under the button."""
    if not image or not writable(data):  # a report cached before images were named; data outside the data folder
        return
    taken = decided.get(image)
    if taken is not None:
        where.caption("decided: " + ("excluded" if taken.action == "exclude" else f"relabel as {md(taken.label)}"))
        if where.button("Restore", key=f"{key}-restore", help="back to what the data says"):
            _decide(key, dec.restore, data, image)
        show_flash(where, key)
        return
    others = [n for n in names if n != given]
    target = where.selectbox("Relabel as", others, index=relabel_default(others, predicted), key=f"{key}-to")
    if where.button("Relabel", key=f"{key}-relabel", help=f"train {code(image)} as the class chosen above"):
        _decide(key, dec.relabel, data, image, target)
    if where.button("Exclude", key=f"{key}-exclude", help=f"leave {code(image)} out of training and data reports"):
        _decide(key, dec.exclude, data, image)
    show_flash(where, key)
