"""metrics.jsonl, one row per finished epoch: what a row must hold, read tolerantly, checked strictly.

Why both: every page, table and plot reads these rows (``m["val_acc"]``, ``m["lr"].items()``), so
a row of another shape (``{"epoch": 1}`` in an imported bundle, a line edited by hand) broke the Runs
page for everyone. Readers get only rows of the right shape (the rest are skipped, as a torn line is;
a missing secondary number is filled with 0), so a run folder damaged that way is still listed and
can be deleted; an import refuses a file whose rows are not of that shape, naming what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.files import JsonBoundsError, loads_bounded

# what a row cannot be shown without: a row lacking one is skipped by readers
REQUIRED = ("epoch", "train_loss", "val_loss", "val_acc")
# what every row the workbench writes holds besides (EpochEnded): filled with 0 when a reader misses it
FILLED: dict[str, float | int] = {"train_acc": 0.0, "epoch_s": 0.0, "images_per_s": 0.0, "trainable_params": 0,
                                  "elapsed_s": 0.0}
OPTIONAL = ("val_macro_f1", "val_balanced_acc")  # newer numbers: None when absent


def _is_number(value: Any) -> bool:
    """A JSON number (NaN included: a diverged epoch's loss), never a bool or text."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_epoch(value: Any) -> bool:
    """An epoch number: a whole number from 1, never a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a complete metrics row (missing keys named, wrong types), or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    missing = [k for k in (*REQUIRED, *FILLED) if k not in row]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not _is_epoch(row["epoch"]):
        return "has an epoch that is not a whole number from 1"
    wrong = [k for k in (*REQUIRED[1:], *FILLED) if not _is_number(row[k])]
    if wrong:
        return f"has {', '.join(wrong)} that {'is' if len(wrong) == 1 else 'are'} not a number"
    lr = row.get("lr", {})
    if not (isinstance(lr, dict) and all(isinstance(k, str) and _is_number(v) for k, v in lr.items())):
        return "has an lr that is not a map of group names to numbers"
    return None


def usable_row(row: Any) -> dict[str, Any] | None:
    """``row`` as readers may use it (every key of REQUIRED and FILLED a number, ``lr`` a map of numbers,
    OPTIONAL a number or None), or None when a required key is missing or of the wrong type."""
    if not isinstance(row, dict):
        return None
    if not _is_epoch(row.get("epoch")):
        return None
    if not all(_is_number(row.get(k)) for k in REQUIRED[1:]):
        return None
    clean = dict(row)
    for key, fill in FILLED.items():
        if not _is_number(clean.get(key)):
            clean[key] = fill
    lr = clean.get("lr")
    clean["lr"] = ({k: v for k, v in lr.items() if isinstance(k, str) and _is_number(v)}
                   if isinstance(lr, dict) else {})
    for key in OPTIONAL:
        if not _is_number(clean.get(key)):
            clean[key] = None
    return clean


def _parsed_lines(path: Path) -> list[Any]:
    """Every line that parses as bounded JSON (a torn last line after a kill, or garbage, is no row)."""
    parsed = []
    try:
        with path.open() as fh:
            for line in fh:
                if line.strip():
                    try:
                        parsed.append(loads_bounded(line))
                    except ValueError:
                        continue
    except (OSError, UnicodeDecodeError):
        pass
    return parsed


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The usable rows of a metrics file, in order; never raises."""
    return [clean for row in _parsed_lines(path) if (clean := usable_row(row)) is not None]


def text_problem(text: str) -> str | None:
    """The strict check an import makes: every line is bounded JSON and a complete row (a bundle is
    written whole by an export, so nothing in it is torn); the first problem, or None."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads_bounded(line)
        except JsonBoundsError as exc:
            return f"metrics.jsonl line {number} is refused: {exc}"
        except ValueError:
            return f"metrics.jsonl line {number} is not valid JSON"
        why = row_problem(row)
        if why is not None:
            return f"metrics.jsonl line {number} {why}"
    return None
