"""The datasets a person can pick, each under one short name (a *ref*) that every page, the URL and a
teammate's link share: the built-in sets, the builder's datasets, folders copied into the data folder,
and zips uploaded through the app.

Why refs and not paths: a page's choice has to survive a page switch, a refresh (the URL carries it)
and a link sent to a teammate, and a URL must never carry a server path nor be able to point outside
the data folder. A ref names a dataset relative to the data folder; ``resolve_dataset`` turns it back
into what ``load_source`` reads, inside the data folder or refused.

    digits | lfw                 built-in sets (shipped in scikit-learn / scikit-image wheels)
    built:<name>                 a dataset made with the builder (a folder with the builder's marker)
    folder:<name>                any other folder in the data folder
    zip:<stored name>            a zip uploaded through the app (data/uploads/datasets/<sha12>_<name>.zip)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import DataError
from engine.core.files import is_plain_file
from engine.core.paths import data_root, resolve_data_path
from engine.data.archive import extract_upload, is_hidden_name
from engine.data.builder import MARKER, RESERVED

BUILT_INS = {"digits": "digits (built-in)", "lfw": "lfw faces (built-in)"}
UPLOADED_ZIPS = ("uploads", "datasets")  # where the app stores uploaded zips, under the data folder
KINDS = ("built", "folder", "zip")


@dataclass(frozen=True)
class DatasetEntry:
    """One pickable dataset: ``ref`` is what pages and URLs keep, ``label`` what a person reads."""

    ref: str
    label: str
    kind: str  # builtin | built | folder | zip


def uploads_folder(root: Path | None = None) -> Path:
    return (root or data_root()).joinpath(*UPLOADED_ZIPS)


def zip_display_name(stored: str) -> str:
    """'3f2a9c1b0d4e_shapes.zip' -> 'shapes.zip': the name the user uploaded it under."""
    head, sep, tail = stored.partition("_")
    return tail if sep and len(head) == 12 and tail else stored


def list_datasets(root: Path | None = None) -> list[DatasetEntry]:
    """Built-ins first, then the data folder's datasets by name, then uploaded zips (newest first)."""
    base = root or data_root()
    entries = [DatasetEntry(ref, label, "builtin") for ref, label in BUILT_INS.items()]
    if base.is_dir():
        for folder in sorted(base.iterdir(), key=lambda p: p.name.lower()):
            if is_hidden_name(folder.name) or folder.name in RESERVED or folder.is_symlink() or not folder.is_dir():
                continue
            if (folder / MARKER).is_file():
                entries.append(DatasetEntry(f"built:{folder.name}", f"{folder.name} (built here)", "built"))
            else:
                entries.append(DatasetEntry(f"folder:{folder.name}", f"{folder.name} (folder)", "folder"))
    zips = uploads_folder(base)
    if zips.is_dir():
        stored = [p for p in zips.iterdir() if p.suffix.lower() == ".zip" and is_plain_file(p)
                  and not is_hidden_name(p.name)]
        for path in sorted(stored, key=lambda p: p.stat().st_mtime, reverse=True):
            entries.append(DatasetEntry(f"zip:{path.name}", f"{zip_display_name(path.name)} (uploaded zip)", "zip"))
    return entries


def dataset_label(ref: str, root: Path | None = None) -> str:
    """How a ref reads on screen, also when it is no longer in the data folder."""
    if ref in BUILT_INS:
        return BUILT_INS[ref]
    kind, _, name = ref.partition(":")
    if kind == "zip":
        return f"{zip_display_name(name)} (uploaded zip)"
    if kind == "built":
        return f"{name} (built here)"
    return f"{name} (folder)" if kind == "folder" else ref


def zip_ref(stored: Path) -> str:
    """The ref of a zip the app has just stored (ui.uploads.save_upload)."""
    return f"zip:{Path(stored).name}"


def resolve_dataset(ref: str, root: Path | None = None) -> str:
    """What ``load_source`` reads for a ref: a built-in name or a folder inside the data folder (a zip
    is extracted once, beside it). A ref from a URL is untrusted: anything that is not one plain name
    inside the data folder is refused, and a dataset that is gone is said to be gone."""
    if not isinstance(ref, str) or not ref:
        raise DataError("No dataset picked: choose one of the built-in sets or a dataset in the data folder.")
    if ref in BUILT_INS:
        return ref
    kind, sep, name = ref.partition(":")
    if not sep or kind not in KINDS or not _plain_name(name):
        raise DataError(f"'{_cut(ref)}' is not a dataset this app knows: pick one from the list.")
    base = root or data_root()
    if kind == "zip":
        stored = uploads_folder(base) / name
        if not is_plain_file(stored) or stored.suffix.lower() != ".zip":
            raise DataError(f"The uploaded zip {zip_display_name(name)} is no longer on this server: upload it again.")
        return str(extract_upload(stored, display_name=zip_display_name(name)))
    folder = resolve_data_path(name, base)
    if not folder.is_dir() or name in RESERVED:
        raise DataError(f"The dataset '{name}' is no longer in the data folder: pick another or build it again.")
    return str(folder)


def _plain_name(name: str) -> bool:
    """One path part, no hidden or relative names: the only names a ref may carry."""
    return bool(name) and len(name) <= 255 and "/" not in name and "\\" not in name and "\0" not in name \
        and not is_hidden_name(name) and name not in (".", "..")


def _cut(text: str) -> str:
    from engine.core.errors import printable

    text = printable(text)
    return text if len(text) <= 60 else text[:57] + "..."
