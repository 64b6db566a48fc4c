"""Errors whose message is written for the person using the tool.

The CLI prints them as one line and the app shows them in a box; neither shows a traceback.
Anything that is *not* an EngineError is a bug in the engine and keeps its traceback.
"""
from __future__ import annotations


def printable(text: str) -> str:
    """``text`` as it may appear in a message: control characters (an escape sequence, a newline) become
    '?', so a name from a file or a zip cannot forge or break the one line a refusal is."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


class EngineError(Exception):
    """A problem the user can act on (bad name, bad file, no network)."""


class UnknownModelError(EngineError):
    """The model name is in neither timm nor torchvision."""


class WeightsError(EngineError):
    """Weights could not be found, read, or do not fit the architecture."""


class HubUnavailableError(WeightsError):
    """Hub weights were asked for but cannot be downloaded (offline, blocked)."""


class ImageError(EngineError):
    """A file is not a readable image (wrong type, truncated, too large)."""


class DataError(EngineError):
    """The data cannot be used as given (no classes, one class, bad archive ...)."""


class RunError(EngineError):
    """A run cannot be found, started, resumed or read."""
