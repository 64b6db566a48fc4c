"""What a browser may see of an error: a user error in a box, a bug as an error id (the trace
goes to the server log), never a traceback or a server path.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, ParamSpec

import streamlit as st

from engine.core.errors import EngineError

P = ParamSpec("P")


def public_message(text: str) -> str:
    """A message fit for the browser: server folders become the names a user knows."""
    from engine.core.paths import PROJECT_ROOT, data_root, runs_root

    for folder, shown in ((data_root(), "data folder"), (runs_root(), "runs folder"), (PROJECT_ROOT, "app")):
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form + "/", "").replace(form, shown)
    return text


def show_error(exc: Exception, where=None) -> None:
    """A user error in a box (beside its widget when ``where`` is given); anything else as unexpected.

    An engine message is plain text that often quotes a file, a class or a label someone else wrote: it
    is escaped (ui.text.md), so it never renders as a link or markup."""
    from ui.text import md

    if isinstance(exc, EngineError):
        (where or st).error(md(public_message(str(exc))))
    else:
        report_unexpected(exc, where)


def report_unexpected(exc: BaseException, where=None) -> str:
    """A bug: a short message with an error id in the page; the full trace in the server log."""
    import logging
    import secrets

    error_id = secrets.token_hex(4)
    logging.getLogger("workbench").error("error id %s", error_id, exc_info=exc)
    (where or st).error(f"Something went wrong here (error id {error_id}). The details are in the server log; "
                        "your runs and data are untouched.")
    return error_id


def guarded(body: Callable[P, Any]) -> Callable[P, Any]:
    """``body`` behind the app's error boundary (streamlit_app.py): a user error in a box, a bug as an
    error id, and the rest of the page still drawn.

    Why: a fragment (``st.fragment``) reruns on its own, outside the page script's try/except, so an
    exception in it showed Streamlit's own error box, and with ``run_every`` once a second. Streamlit's
    control flow (st.rerun, st.stop) is a BaseException and passes through.
    """
    @functools.wraps(body)  # st.fragment identifies a fragment by its function's module and name
    def behind_boundary(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return body(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the boundary, as in streamlit_app.py
            show_error(exc)
            return None

    return behind_boundary


def safe_fragment(body: Callable[P, Any], run_every: float | None = None) -> Callable[P, Any]:
    """``st.fragment`` whose body sits behind the error boundary: use it for every fragment of the app."""
    return st.fragment(guarded(body), run_every=run_every)


def contained(section: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Draw one section of a page; when it fails, its error box takes its place and the page goes on
    (the Runs page's Delete must render whatever a run's files hold). Returns the section's value, or
    None when it failed."""
    return guarded(section)(*args, **kwargs)
