"""Decisions about single images - "this one is really a dog", "leave this one out" - kept beside the
data, applied whenever the data is read, and never done to the files themselves.

Why a file of decisions rather than moving files: the evidence that an image is mislabelled comes
from a model, and models are wrong too. A decision has to be cheap to take back (``undo`` removes the
last one, ``restore`` the last word on one image; taking them: engine.data.decisions), readable by a person, and must leave the original
folder exactly as it was, so another tool (or the next person) still sees the data as delivered.

Where the decisions live (``overrides_path``):

- a dataset folder: ``<folder>/workbench-overrides.json`` (travels with the folder);
- a zip: ``<zip folder>/<name>.zip.workbench-overrides.json`` beside it (its extraction is rebuilt freely);
  a folder zipped with its own overrides file keeps those decisions, applied first;
- a built-in set (digits, lfw, cifar10): ``<data folder>/overrides/<name>.json`` (it has no folder).

The file is a list of decisions in the order they were taken; the last decision per image counts:
``relabel`` (to another existing class), ``exclude`` (left out of training, splits, evaluation and the
data report) or ``restore`` (back to what the data itself says). Images are named as the data names
them: their path inside the dataset (``cat/001.png``, a labels CSV's path) or ``digits[17]``.

A run records the decisions it trained with (``RUN_FILE`` in its folder) and everything done later
with that run - evaluation, the mislabelled ranking, exports, a resumed training - reads the data with
those, so its split and its scores stay the ones it had. A run made before decisions existed has no
record and trained on the data as delivered, so it reads it with none.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import DataError
from engine.core.files import JsonBoundsError, atomic_write_json, file_lock, is_plain_file, loads_bounded
from engine.core.paths import data_root, lock_dir
from engine.data.layouts import BUILTIN, OVERRIDES_FILE, TORCHVISION_SETS  # layouts know the file's name

if TYPE_CHECKING:
    from engine.data.imageset import ImageSet

ZIP_SUFFIX = ".workbench-overrides.json"
RUN_FILE = "data-overrides.json"  # in a run's folder: the decisions it trained with
VERSION = 1
ACTIONS = ("relabel", "exclude", "restore")
OWN_KEYS = ("image", "action", "label", "at")  # a decision's keys this workbench writes; others are a person's
MAX_BYTES = 20 * 1024 * 1024  # ~150,000 decisions: far more than anyone clicks
MAX_NAME = 1024
ABOUT = ("Decisions about single images, in the order they were taken; the last one per image counts. "
         "relabel: train it as another class; exclude: leave it out; restore: back to what the data says. "
         "The image files themselves are never moved or changed. Written by the workbench "
         "(Evaluate page, or python -m engine data); delete this file to start over.")


@dataclass(frozen=True)
class Decision:
    """One decision about one image."""

    image: str  # its name inside the dataset: 'cat/001.png' or 'digits[17]'
    action: str  # relabel | exclude | restore
    label: str | None = None  # the class, for relabel
    at: str = ""  # when (UTC, ISO 8601): for the person reading the file
    # keys a person added beside a decision (a "note", who decided): kept when the file is written again
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "image": self.image, "action": self.action}
        if self.label is not None:
            out["label"] = self.label
        if self.at:
            out["at"] = self.at
        return out

    def line(self) -> str:
        """'relabel cat/001.png as dog' | 'exclude cat/002.png' | 'restore cat/001.png'"""
        return f"{self.action} {self.image}" + (f" as {self.label}" if self.action == "relabel" else "")


@dataclass
class Overrides:
    """The decisions about one dataset, oldest first."""

    decisions: list[Decision] = field(default_factory=list)
    file: str = ""  # the file's name, for messages
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # a person's own top-level keys, kept

    @property
    def empty(self) -> bool:
        return not self.state()

    def state(self) -> dict[str, Decision]:
        """The decision that counts per image (the last one); restored images are not in it."""
        last: dict[str, Decision] = {}
        for d in self.decisions:
            last[d.image] = d
        return {k: d for k, d in last.items() if d.action != "restore"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "version": VERSION, "about": ABOUT, "decisions": [d.to_dict() for d in self.decisions]}

    @classmethod
    def from_dict(cls, data: Any, shown: str = OVERRIDES_FILE) -> Overrides:
        """The decisions of a parsed file; anything malformed is one DataError naming the file and entry."""
        fix = "fix it, or delete it to start over (the image files are untouched)"
        if not isinstance(data, dict) or not isinstance(data.get("decisions"), list):
            raise DataError(f"{shown} is not an overrides file (it needs a 'decisions' list); {fix}.")
        if data.get("version", VERSION) != VERSION:
            raise DataError(f"{shown} has version {str(data.get('version'))[:20]}; this workbench reads version "
                            f"{VERSION}; {fix}.")
        decisions = []
        for n, raw in enumerate(data["decisions"], 1):
            where = f"{shown} decision {n}"
            if not isinstance(raw, dict):
                raise DataError(f"{where} is not an object with 'image' and 'action'; {fix}.")
            image, action, label = raw.get("image"), raw.get("action"), raw.get("label")
            if not isinstance(image, str) or not image.strip() or len(image) > MAX_NAME or "\x00" in image:
                raise DataError(f"{where} names no image; {fix}.")
            if action not in ACTIONS:
                raise DataError(f"{where} has the action '{str(action)[:20]}' (use {', '.join(ACTIONS)}); {fix}.")
            if action == "relabel" and (not isinstance(label, str) or not label.strip()):
                raise DataError(f"{where} relabels {image[:80]} without a class ('label'); {fix}.")
            at = raw.get("at")
            extra = {k: v for k, v in raw.items() if k not in OWN_KEYS}
            if action != "relabel" and label is not None:
                extra["label"] = label  # a label beside an exclude is the person's note, not a class
            decisions.append(Decision(image=image, action=action, label=label if action == "relabel" else None,
                                      at=at if isinstance(at, str) else "", extra=extra))
        return cls(decisions=decisions, file=shown,
                   extra={k: v for k, v in data.items() if k not in ("version", "about", "decisions")})


# ------------------------------------------------------------------ where, read, write

def overrides_path(source: str) -> Path:
    """Where the decisions about ``source`` (a built-in name, a folder or a .zip) are kept."""
    if source in BUILTIN or source in TORCHVISION_SETS:
        return data_root() / "overrides" / f"{source}.json"
    path = Path(source)
    if path.suffix.lower() == ".zip":
        return path.with_name(path.name + ZIP_SUFFIX)
    return path / OVERRIDES_FILE


def read_file(path: Path, shown: str | None = None) -> Overrides:
    """The decisions in ``path``; none when it does not exist. A link, an oversized, unreadable or
    malformed file is a DataError (training refuses rather than silently ignoring someone's decisions)."""
    shown = shown or path.name
    if path.is_symlink():
        raise DataError(f"{shown} is a link; an overrides file is read only when it is a plain file.")
    if not path.exists():
        return Overrides(file=shown)
    if not is_plain_file(path):  # a pipe would block the read forever
        raise DataError(f"{shown} is not a plain file (a pipe, device or folder); an overrides file is read only "
                        "when it is one.")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DataError(f"{shown} is {size / 1e6:.1f} MB; an overrides file may be at most {MAX_BYTES / 1e6:.0f} MB.")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{shown} cannot be read ({exc.strerror or type(exc).__name__}).") from exc
    except UnicodeDecodeError:
        raise DataError(f"{shown} is not UTF-8 text; fix it, or delete it to start over.") from None
    try:
        data = loads_bounded(text)
    except JsonBoundsError as exc:
        raise DataError(f"{shown} is refused: {exc}; fix it, or delete it to start over (the image files are "
                        "untouched).") from None
    except ValueError as exc:
        raise DataError(f"{shown} is not valid JSON ({exc.msg}, line {getattr(exc, 'lineno', '?')}); fix it, "
                        "or delete it to start over (the image files are untouched).") from None
    return Overrides.from_dict(data, shown)


def read_overrides(source: str) -> Overrides:
    """The current decisions about a dataset (none for data named by URL: no file of it is read here)."""
    if "://" in str(source):
        return Overrides()
    return read_file(overrides_path(source))


def overrides_stamp(source: str) -> float:
    """The overrides file's mtime (0 without one): a cache key that changes with every decision."""
    try:
        return overrides_path(source).stat().st_mtime_ns / 1e9
    except (OSError, ValueError):
        return 0.0


def run_overrides(run_path: str | Path) -> Overrides:
    """The decisions a run trained with; none for a run that has no record (made before decisions existed)."""
    return read_file(Path(run_path) / RUN_FILE)


def save_run_overrides(run_path: str | Path, overrides: Overrides) -> None:
    atomic_write_json(Path(run_path) / RUN_FILE, overrides.to_dict())


def decisions_lock(path: Path) -> file_lock:
    """A lock per overrides file, kept in the machine's lock folder (never a file in the user's dataset)."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    return file_lock(lock_dir() / f"overrides-{digest}.lock")


def write_file(path: Path, overrides: Overrides) -> None:
    """Save the decisions (atomically); a failed write is a DataError that says the decision is not saved."""
    try:
        atomic_write_json(path, overrides.to_dict())
    except OSError as exc:
        raise DataError(f"{path.name} cannot be written ({exc.strerror or type(exc).__name__}); the decision "
                        "is not saved.") from exc


# ------------------------------------------------------------------ applying

def image_key(ds: ImageSet, i: int) -> str:
    """How decisions name image ``i``: its path inside the dataset, or 'digits[17]'."""
    name = getattr(ds.loaders[i], "name", None)
    return name if isinstance(name, str) else ds.sources[i]


def apply_overrides(ds: ImageSet, overrides: Overrides) -> ImageSet:
    """``ds`` with the decisions applied (in place, and returned): excluded images removed, relabelled ones
    moved to their class. ``ds.overrides`` says what was done; decisions that match no image (a file
    deleted, a class folder renamed) are listed there as ``unmatched`` and otherwise ignored."""
    state = overrides.state()
    index = {c: n for n, c in enumerate(ds.class_names)}
    keep, labels, seen = [], [], set()
    relabelled = excluded = 0
    for i in range(len(ds)):
        key = image_key(ds, i)
        decision = state.get(key)
        if decision is not None:
            seen.add(key)
        if decision is not None and decision.action == "exclude":
            excluded += 1
            continue
        label = ds.labels[i]
        if decision is not None and decision.label in index and index[decision.label] != label:
            label = index[decision.label]
            relabelled += 1
        keep.append(i)
        labels.append(label)
    unmatched = [d.line() + (" (no such image)" if k not in seen else f" (no class '{d.label}')")
                 for k, d in state.items()
                 if k not in seen or (d.action == "relabel" and d.label not in index)]
    if len(keep) != len(ds):
        ds.loaders = [ds.loaders[i] for i in keep]
        ds.sources = [ds.sources[i] for i in keep]
        if ds.splits is not None:
            ds.splits = [ds.splits[i] for i in keep]
    ds.labels = labels
    ds.overrides = {"file": overrides.file, "relabelled": relabelled, "excluded": excluded, "unmatched": unmatched,
                    "decisions": [d.to_dict() for d in overrides.decisions]} if overrides.decisions else {}
    return ds


def with_zipped(ds: ImageSet, overrides: Overrides) -> Overrides:
    """A zip's decisions: those of the folder it was made from (its own overrides file, zipped along: part
    of the data as delivered), then ``overrides``, the ones kept beside the zip."""
    root = next((getattr(loader, "root_real", None) for loader in ds.loaders if getattr(loader, "root_real", None)),
                None)
    zipped = read_file(Path(root) / OVERRIDES_FILE, f"{OVERRIDES_FILE} in the zip") if root else Overrides()
    if not zipped.decisions:
        return overrides
    shown = f"{zipped.file} and {overrides.file}" if overrides.decisions else zipped.file
    return Overrides(decisions=zipped.decisions + overrides.decisions, file=shown)


def applied_overrides(ds: ImageSet) -> Overrides:
    """The decisions ``load_source`` applied to ``ds`` (what a run records as the ones it trained with)."""
    return Overrides.from_dict({"decisions": ds.overrides.get("decisions", [])}, RUN_FILE)


def describe(summary: dict[str, Any]) -> str:
    """The data report's line: '2 image(s) relabelled, 1 excluded by workbench-overrides.json (...)'."""
    if not summary:
        return ""
    text = (f"{summary['relabelled']} image(s) relabelled, {summary['excluded']} excluded by {summary['file']} "
            "(the files themselves are untouched)")
    if summary.get("unmatched"):
        gone = summary["unmatched"]
        text += f"; {len(gone)} decision(s) match nothing and are ignored: " + "; ".join(gone[:3]) + \
            (" ..." if len(gone) > 3 else "")
    return text + "."
