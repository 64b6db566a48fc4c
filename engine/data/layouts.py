"""Which layout a dataset folder has, and its labels file when it has one.

Three layouts, looked for in this order (``detect_layout``):

- **a labels CSV** at the top of the folder (``labels.csv``, or the one ``*.csv`` whose header names
  ``path`` and ``label``): ``path,label`` or ``path,label,split``, paths relative to the CSV's folder;
- **split folders**: ``train/`` holding class folders, with ``val/`` (or ``valid/``, ``validation/``)
  and/or ``test/`` beside it, each holding class folders: the given split is used;
- **one folder per class** (the default): a random stratified split.

This module reads names and text only: which files may be read, and the images themselves, are
checked by engine.data.datasets (links, the dataset boundary, bounded decodes), the one place for it.
"""
from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.core.errors import DataError
from engine.core.files import is_plain_file
from engine.data.archive import is_hidden_name
from engine.data.images import IMAGE_SUFFIXES

BUILTIN = ("digits", "lfw")  # data that ships in the wheels (engine.data.datasets reads them)
TORCHVISION_SETS = ("cifar10",)  # downloaded by torchvision when asked for

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")  # folder names that make the split layout
LABELS_CSV = "labels.csv"
OVERRIDES_FILE = "workbench-overrides.json"  # engine.data.overrides keeps its decisions there
MAX_CSV_BYTES = 20 * 1024 * 1024  # 20 MB: ~200,000 rows of long paths
MAX_CSV_ROWS = 200_000  # ten times the files a zip upload may hold
CSV_HELP = ("its first line must be the header path,label (or path,label,split), then one line per image, "
            "e.g. images/cat1.jpg,cat,train; paths relative to the CSV's folder")


@dataclass
class Layout:
    """What ``detect_layout`` found: ``kind`` is "classes", "splits" or "csv"."""

    kind: str
    why: str  # one phrase for the data report: which files made this the layout
    split_dirs: dict[str, Path] = field(default_factory=dict)  # "train"/"val"/"test" -> folder (splits)
    csv: Path | None = None
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): listed as skipped


@dataclass
class CsvRow:
    line: int
    path: str  # normalised: relative, '/'-separated, no '.' parts
    label: str
    split: str | None


@dataclass
class LabelsCsv:
    rows: list[CsvRow]
    skipped: list[tuple[str, str]]  # (file or "labels.csv line N", reason)
    has_split: bool
    ignored_columns: list[str]


def _csv_header(path: Path) -> list[str] | None:
    """The lower-cased first row of a CSV (BOM removed), None when it cannot be read as text."""
    if not is_plain_file(path):  # a pipe named .csv would block the read forever
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
        text = head.decode("utf-8-sig", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        return None
    try:
        row = next(csv.reader([text[0]]))
    except (csv.Error, StopIteration):
        return None
    return [c.strip().lower() for c in row]


def _is_labels_header(cols: list[str] | None) -> bool:
    return bool(cols) and "path" in cols and "label" in cols


def _split_dirs(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Top-level split folders (real folders, never links), by split; the duplicates' names."""
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() or not entry.is_dir() or is_hidden_name(entry.name):
            continue
        split = SPLIT_NAMES.get(entry.name.lower()) if entry.name.lower() in SPLIT_FOLDERS else None
        if split:
            found.setdefault(split, []).append(entry)
    dupes = [" and ".join(f"{p.name}/" for p in paths) for paths in found.values() if len(paths) > 1]
    return {s: paths[0] for s, paths in found.items()}, dupes


def _holds_folders(folder: Path) -> bool:
    return any(p.is_dir() and not p.is_symlink() and not is_hidden_name(p.name) for p in folder.iterdir())


def detect_layout(root: Path) -> Layout:
    """The layout of the dataset folder ``root`` and why (see the module docstring)."""
    entries = [e for e in sorted(root.iterdir()) if not is_hidden_name(e.name)]
    csvs = [e for e in entries if e.suffix.lower() == ".csv" and not e.is_dir()]
    ignored: list[tuple[str, str]] = []
    chosen = next((e for e in csvs if e.name.lower() == LABELS_CSV), None)
    if chosen is None and csvs:  # a link is never opened, not even to read its header
        labelled = [e for e in csvs if not e.is_symlink() and _is_labels_header(_csv_header(e))]
        if len(labelled) > 1:
            raise DataError(f"Several labels files ({', '.join(e.name for e in labelled)}): keep one, or name the "
                            f"one to use {LABELS_CSV}.")
        if labelled:
            chosen = labelled[0]
        elif len(csvs) == 1 and not any(e.is_dir() and not e.is_symlink() for e in entries):
            chosen = csvs[0]  # nothing else could be the layout: say what is wrong with this CSV
    if chosen is not None:
        if chosen.is_symlink():
            raise DataError(f"{chosen.name} is a link; a labels file is read only when it is a plain file in the "
                            "dataset folder (copy it there).")
        ignored += [(e.name, f"not the labels file ({chosen.name} is used)") for e in csvs if e != chosen]
        return Layout("csv", f"{chosen.name} beside the images", csv=chosen, ignored=ignored)
    ignored += [(e.name, f"a CSV that is not a labels file (its header is not path,label); {CSV_HELP}")
                for e in csvs]
    dirs, dupes = _split_dirs(root)
    if dupes:
        raise DataError(f"Folders {dupes[0]} both name the same split; keep one of them.")
    train = dirs.get("train")
    if train is not None and _holds_folders(train):
        named = [f"{dirs[s].name}/" for s in SPLITS if s in dirs]
        why = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named) + \
            (" folders" if len(named) > 1 else " folder")
        split_names = {p.name for p in dirs.values()}
        for e in entries:  # the overrides file (engine.data.overrides) is the workbench's own, never "not used"
            if e.name not in split_names and e not in csvs and e.name != OVERRIDES_FILE:
                if e.is_symlink():
                    why = "a link: split folders are never links (links to folders are not followed); not used"
                else:
                    why = f"not {'a split folder' if e.is_dir() else 'in a split folder'} (train/, val/, test/): not used"
                ignored.append((e.name, why))
        return Layout("splits", why, split_dirs={s: dirs[s] for s in SPLITS if s in dirs}, ignored=ignored)
    return Layout("classes", "one folder per class", ignored=ignored)


def split_note(why: str, given: set[str]) -> str:
    """The data report's sentence for a layout that names its splits: which are used as given."""
    held = "; test is held out (evaluated once, at the end of a run)" if "test" in given else ""
    if "val" in given:
        return f"{why}: the given split is used{held}."
    if "train" in given:
        return f"{why}, no validation images: validation is a random stratified share of train{held}."
    return f"{why}: no training images."


# ------------------------------------------------------------------ the labels CSV

_DRIVE = re.compile(r"^[A-Za-z]:")


def normalise_path(text: str) -> tuple[str | None, str | None]:
    """(the path, relative and '/'-separated, or None; why not). Backslashes count as separators."""
    raw = text.strip().replace("\\", "/")
    if not raw:
        return None, "no path"
    if raw.startswith("/") or _DRIVE.match(raw):
        return None, "absolute path (paths are relative to the CSV's folder)"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "path with '..' (leaves the dataset folder)"
    if not parts:
        return None, "no path"
    if any(is_hidden_name(p) for p in parts):
        return None, "hidden file or folder"
    return "/".join(parts), None


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


MAX_LABEL = 200  # characters in a class name


def usable_class_name(name: str) -> bool:
    """A class name this workbench can print on one line and carry in a run bundle: not empty, at most
    MAX_LABEL characters, no control characters (an escape sequence, a newline). CSV labels, class
    folders and an imported bundle's classes are held to it alike."""
    return bool(name) and len(name) <= MAX_LABEL and name.isprintable()


def read_labels_csv(path: Path) -> LabelsCsv:
    """The rows of a labels CSV; a malformed file is one clear DataError, a bad row is skipped with the
    reason (rows: blank lines ignored, duplicates and rows without a label or with an unknown split skipped)."""
    shown = path.name
    reader = csv.reader(io.StringIO(_labels_text(path), newline=""), strict=True)
    header = _labels_header(reader, shown)
    table = _LabelsTable(shown, [c.strip().lower() for c in header])
    count = 0
    for line, row in _labels_rows(reader, shown):
        count += 1
        table.add(line, row)
    if not count:
        raise DataError(f"{shown} has a header but no rows: {CSV_HELP}.")
    ignored = [header[i].strip() for i, c in enumerate(table.cols) if c not in ("path", "label", "split")]
    return LabelsCsv(rows=table.rows, skipped=table.skipped, has_split=table.isplit is not None,
                     ignored_columns=ignored)


def _labels_text(path: Path) -> str:
    """The labels file's text: a plain file of at most MAX_CSV_BYTES, UTF-8 (a BOM removed), no NUL, not blank."""
    shown = path.name
    if not is_plain_file(path):
        raise DataError(f"{shown} is not a plain file (a pipe, device, link or folder); a labels file is read only "
                        "when it is one.")
    try:
        size = path.stat().st_size
        if size > MAX_CSV_BYTES:
            raise DataError(f"{shown} is {_size(size)}; a labels file may be at most {_size(MAX_CSV_BYTES)}.")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{shown} cannot be read ({exc.strerror or type(exc).__name__}).") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{shown} is not UTF-8 text; save it as CSV (UTF-8).") from None
    if "\x00" in text:
        raise DataError(f"{shown} is not a text file (it holds NUL bytes); save it as CSV (UTF-8).")
    if not text.strip():
        raise DataError(f"{shown} is empty: {CSV_HELP}.")
    return text


def _labels_header(reader: Any, shown: str) -> list[str]:
    """The first non-blank row, checked to name path and label once each (a missing header is said as such)."""
    try:
        header = next(r for r in reader if any(c.strip() for c in r))
    except StopIteration:
        raise DataError(f"{shown} is empty: {CSV_HELP}.") from None
    except csv.Error as exc:
        raise DataError(f"{shown} line {reader.line_num} is not valid CSV ({exc}).") from None
    cols = [c.strip().lower() for c in header]
    if "path" not in cols or "label" not in cols:
        first = ",".join(c.strip() for c in header)[:80]
        if any(c.strip().lower().endswith(IMAGE_SUFFIXES) for c in header):
            raise DataError(f"{shown} has no header row (its first line is '{first}'): {CSV_HELP}.")
        sep = " (columns are separated by commas)" if len(header) == 1 and re.search(r"[;\t|]", header[0]) else ""
        raise DataError(f"{shown} has the columns '{first}'{sep}: {CSV_HELP}.")
    twice = sorted({c for c in cols if c and cols.count(c) > 1})
    if twice:
        raise DataError(f"{shown}: the column '{twice[0]}' appears twice in the header.")
    return header


def _labels_rows(reader: Any, shown: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each non-blank row after the header; invalid CSV or over MAX_CSV_ROWS rows refuses."""
    count = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{shown} line {reader.line_num} is not valid CSV ({exc}).") from None
        line = reader.line_num
        if not any(c.strip() for c in row):
            continue
        count += 1
        if count > MAX_CSV_ROWS:
            raise DataError(f"{shown} has more than {MAX_CSV_ROWS:,} rows; that is the limit of a labels file.")
        yield line, row


class _LabelsTable:
    """The rows of one labels CSV as they are read: the ones kept, the ones skipped and why."""

    def __init__(self, shown: str, cols: list[str]) -> None:
        self.shown, self.cols = shown, cols
        self.ip, self.il = cols.index("path"), cols.index("label")
        self.isplit = cols.index("split") if "split" in cols else None
        self.rows: list[CsvRow] = []
        self.skipped: list[tuple[str, str]] = []
        self.seen: dict[str, CsvRow] = {}
        self.lowered: dict[str, str] = {}

    def add(self, line: int, row: list[str]) -> None:
        """Keep the row, or skip it with the reason; labels that differ only by case refuse the file."""
        where = f"{self.shown} line {line}"
        fields = self._fields(row, where)
        if fields is None:
            return
        rel, label, split = fields
        first = self.seen.get(rel)
        if first is not None:
            if first.label != label:
                why = f"listed again with another label ('{label}'; line {first.line} says '{first.label}')"
            elif first.split != split:
                why = f"listed again in another split ({split}; line {first.line} says {first.split})"
            else:
                why = f"listed twice (first on line {first.line})"
            self.skipped.append((rel, f"{where}: {why}; the first line is used"))
            return
        if label.lower() in self.lowered and self.lowered[label.lower()] != label:
            raise DataError(f"{self.shown}: the labels '{self.lowered[label.lower()]}' and '{label}' differ only by "
                            "case; make them one.")
        self.lowered[label.lower()] = label
        self.seen[rel] = CsvRow(line, rel, label, split)
        self.rows.append(self.seen[rel])

    def _fields(self, row: list[str], where: str) -> tuple[str, str, str | None] | None:
        """(path, label, split) of a row, or None when it is skipped (the reason added to ``skipped``)."""
        if len(row) != len(self.cols):
            self.skipped.append((where, f"{len(row)} columns where the header has {len(self.cols)}"))
            return None
        rel, problem = normalise_path(row[self.ip])
        if rel is None:
            self.skipped.append((row[self.ip].strip() or where, f"{where}: {problem}"))
            return None
        label = unicodedata.normalize("NFC", row[self.il].strip())  # one class however the accents were typed
        if not label:
            self.skipped.append((rel, f"{where}: no label"))
            return None
        if not usable_class_name(label):
            self.skipped.append((rel, f"{where}: a label over {MAX_LABEL} characters or with control characters"))
            return None
        split = None
        if self.isplit is not None:
            value = row[self.isplit].strip().lower()
            split = SPLIT_NAMES.get(value)
            if split is None:
                said = f"unknown split '{row[self.isplit].strip()[:20]}'" if value else "no split value"
                self.skipped.append((rel, f"{where}: {said} (use train, val or test)"))
                return None
        return rel, label, split

