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

APPLIES = ("It applies to the next training and data report; this run keeps the data it trained with, so "
           "its scores here do not change.")
_FLASH = "overrides_flash"


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


def _decide(action: Callable[..., Any], *args: str) -> None:
    try:
        done = action(*args)
    except EngineError as exc:
        st.session_state[_FLASH] = ("error", public_message(str(exc)))
    else:
        if done is None:
            text = "Nothing to undo."
        elif action is dec.undo:
            text = f"Undone: {done.line()}. {APPLIES}"
        else:
            text = f"{done.line().capitalize()}: saved in {ov.overrides_path(args[0]).name}. {APPLIES}"
        st.session_state[_FLASH] = ("success", text)
    st.rerun()


def show_flash() -> None:
    """What the last click did (kept across the rerun the click causes)."""
    flash = st.session_state.pop(_FLASH, None)
    if flash:
        (st.success if flash[0] == "success" else st.error)(flash[1])


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
        if st.button("Undo last change", key="ov-undo", help=f"Takes back: {last.line()}"):
            _decide(dec.undo, data)
        excluded = sum(d.action == "exclude" for d in decided.values())
        st.caption(f"{len(decided) - excluded} image(s) relabelled and {excluded} excluded so far "
                   f"({ov.overrides_path(data).name}); the last change: {last.line()}.")


def controls(where: Any, data: str, image: str, given: str, names: list[str],
             decided: dict[str, ov.Decision], key: str) -> None:
    """Under one thumbnail: the decision taken about it and 'Restore', or 'Relabel as' and 'Exclude'."""
    if not image or not writable(data):  # a report cached before images were named; data outside the data folder
        return
    taken = decided.get(image)
    if taken is not None:
        where.caption("decided: " + ("excluded" if taken.action == "exclude" else f"relabel as {taken.label}"))
        if where.button("Restore", key=f"{key}-restore", help="back to what the data says"):
            _decide(dec.restore, data, image)
        return
    others = [n for n in names if n != given]
    target = where.selectbox("Relabel as", others, key=f"{key}-to")
    if where.button("Relabel", key=f"{key}-relabel", help=f"train {image} as the class chosen above"):
        _decide(dec.relabel, data, image, target)
    if where.button("Exclude", key=f"{key}-exclude", help=f"leave {image} out of training and data reports"):
        _decide(dec.exclude, data, image)
