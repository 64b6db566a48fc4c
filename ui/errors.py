"""What a browser may see of an error: a user error in a box, a bug as an error id (the trace
goes to the server log), never a traceback or a server path.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.core.errors import EngineError


def public_message(text: str) -> str:
    """A message fit for the browser: server folders become the names a user knows."""
    from engine.core.paths import PROJECT_ROOT, data_root, runs_root

    for folder, shown in ((data_root(), "data folder"), (runs_root(), "runs folder"), (PROJECT_ROOT, "app")):
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form + "/", "").replace(form, shown)
    return text


def show_error(exc: Exception, where=None) -> None:
    """A user error in a box (beside its widget when ``where`` is given); anything else as unexpected."""
    if isinstance(exc, EngineError):
        (where or st).error(public_message(str(exc)))
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


def guarded(body):
    """The app's error boundary around a fragment: a fragment that reruns alone runs outside the
    router's try/except (streamlit_app.py), so without this a bug in it shows Streamlit's own error box.
    Streamlit's rerun and stop are BaseExceptions and pass through."""
    import functools

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the boundary, as in streamlit_app.py
            show_error(exc)
            return None

    return wrapper
