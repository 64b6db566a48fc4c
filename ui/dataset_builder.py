"""The dataset builder panel (Training page), as in Teachable Machine: classes by name, images by
upload or camera snapshot, thumbnails with a count, remove an image, rename or delete a class.

The folder in the data directory is the only state (engine.data.builder), so the dataset survives a
page refresh and is trainable at once. Messages from an action survive the rerun that follows it.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.core.errors import EngineError
from engine.data.builder import BuiltDataset, built_datasets
from engine.data.images import IMAGE_SUFFIXES
from ui.errors import show_error
from ui.text import md
from ui.uploads import upload_help, upload_limit_mb

NEW = "+ new dataset"
PICKED = "builder_dataset"  # the dataset this session is building
FLASH = "builder_flash"  # (kind, text) messages from the last action, shown after its rerun
SHOWN = 24  # thumbnails (each with its remove button) shown per class before "show all"
_TYPES = sorted({s.lstrip(".") for s in IMAGE_SUFFIXES})


@st.cache_data(show_spinner=False, max_entries=4000)
def _thumb(path: str, mtime_ns: int):
    """A 96 px thumbnail, decoded reduced; keyed by the file's mtime (a replaced file shows anew)."""
    import numpy as np

    from engine.data.images import open_image

    img = open_image(path, target=96)
    img.thumbnail((96, 96))
    return np.asarray(img)


def same_name_as(name: str, classes: list[str], renaming: str | None = None) -> str | None:
    """The existing class that ``name`` would be, spelled as it is (names differing only by case are one
    class: 'Cat' and 'cat' are one folder on macOS and Windows disks), or None."""
    wanted = name.strip().lower()
    return next((c for c in classes if c.lower() == wanted and c != renaming), None)


def same_name_message(name: str, existing: str) -> str:
    """Why ``name`` is refused, naming the class that is there as it is spelled (markdown, escaped)."""
    if name.strip() == existing:
        return f"There is already a class named '{md(existing)}'."
    return (f"There is already a class named '{md(existing)}': '{md(name.strip())}' differs from it only by case, "
            "and names that differ only by case are one class. Add your images to it, or choose another name.")


def _flash(kind: str, text: str) -> None:
    st.session_state.setdefault(FLASH, []).append((kind, text))


def _show_flash() -> None:
    for kind, text in st.session_state.pop(FLASH, []):
        getattr(st, kind)(text)


def _bump(key: str) -> None:
    """A fresh widget key (``_key``): a file uploader or camera empties itself once its files are stored."""
    st.session_state[key] = st.session_state.get(key, 0) + 1


def _key(name: str) -> str:
    return f"{name}-{st.session_state.get(name, 0)}"


def _store(ds: BuiltDataset, cls: str, files: list[tuple[str, bytes]], counter: str) -> None:
    try:
        result = ds.add_images(cls, files)
    except EngineError as exc:
        _flash("error", md(str(exc)))
    else:
        _flash("success" if result.added else "info", f"{md(cls)}: {md(result.summary())}.")
        if result.refused:
            _flash("error", "Not added: " + "; ".join(f"{md(name)}: {md(why)}" for name, why in result.refused))
    _bump(counter)
    st.rerun()


def _new_dataset() -> None:
    with st.form("builder_new", border=False):
        name = st.text_input("New dataset name", placeholder="e.g. my-plants")
        if st.form_submit_button("Create dataset"):
            try:
                ds = BuiltDataset.create(name)
            except EngineError as exc:
                show_error(exc)
            else:
                st.session_state[PICKED] = ds.name
                st.rerun()


def _class_panel(ds: BuiltDataset, cls: str, files: list[str]) -> None:
    with st.container(border=True):
        st.markdown(f"**{md(cls)}** · {len(files)} image{'s' if len(files) != 1 else ''}")
        upload, camera = st.columns([3, 2])
        counter = f"bu-{ds.name}-{cls}"
        picked = upload.file_uploader(f"Add images to {md(cls)}", type=_TYPES, accept_multiple_files=True,
                                      key=_key(counter), max_upload_size=upload_limit_mb(), help=upload_help())
        if picked:
            _store(ds, cls, [(f.name, f.getvalue()) for f in picked], counter)
        shot_counter = f"bc-{ds.name}-{cls}"
        if camera.toggle("Camera", key=f"cam-{ds.name}-{cls}", help="take snapshots with this device's camera"):
            shot = camera.camera_input(f"Snapshot for {md(cls)}", key=_key(shot_counter))
            if shot is not None:
                _store(ds, cls, [("snapshot.jpg", shot.getvalue())], shot_counter)
        show_all = len(files) > SHOWN and st.toggle(f"Show all {len(files)}", key=f"all-{ds.name}-{cls}")
        grid = st.columns(8)
        for i, f in enumerate(files if show_all else files[:SHOWN]):
            cell = grid[i % 8]
            path = ds.root / cls / f
            try:
                cell.image(_thumb(str(path), path.stat().st_mtime_ns), width=72)
            except (EngineError, OSError):
                cell.caption("(unreadable)")
            if cell.button("Remove", key=f"rm-{ds.name}-{cls}-{f}", help=f"remove {md(f)} from {md(cls)}"):
                try:
                    ds.remove_image(cls, f)
                except EngineError as exc:
                    _flash("error", md(str(exc)))
                st.rerun()
        if len(files) > SHOWN and not show_all:
            st.caption(f"... and {len(files) - SHOWN} more")
        with st.popover("Rename or delete"):
            new = st.text_input("New name", cls, key=f"rn-{ds.name}-{cls}")
            if st.button("Rename", key=f"rnb-{ds.name}-{cls}"):
                clash = same_name_as(new, list(ds.classes()), renaming=cls)
                if clash is not None:
                    st.error(same_name_message(new, clash))
                else:
                    try:
                        ds.rename_class(cls, new)
                    except EngineError as exc:
                        show_error(exc)
                    else:
                        st.rerun()
            sure = st.checkbox(f"Yes, delete '{md(cls)}' and its {len(files)} images", key=f"delok-{ds.name}-{cls}")
            if st.button("Delete class", key=f"del-{ds.name}-{cls}", disabled=not sure):
                try:
                    n = ds.delete_class(cls)
                except EngineError as exc:
                    show_error(exc)
                else:
                    _flash("info", f"Deleted class '{md(cls)}' and its {n} images.")
                    st.rerun()


def dataset_builder() -> str | None:
    """The builder; returns the folder of the dataset being built once it has a class, else None."""
    names = built_datasets()
    current = st.session_state.get(PICKED)
    options = [*names, NEW]
    pick = st.selectbox("Dataset", options, index=options.index(current) if current in options else 0,
                        help="Datasets built here are folders in the app's data folder, shared with your team.")
    if pick == NEW:
        _new_dataset()
        return None
    st.session_state[PICKED] = pick
    try:
        ds = BuiltDataset.open(pick)
    except EngineError as exc:
        show_error(exc)
        return None
    _show_flash()
    with st.form(f"add-class-{pick}", border=False, clear_on_submit=True):
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        name = left.text_input("Add a class", placeholder="class name, e.g. healthy")
        if right.form_submit_button("Add class"):
            clash = same_name_as(name, list(ds.classes()))
            if clash is not None:
                _flash("error", same_name_message(name, clash))
            else:
                try:
                    ds.add_class(name)
                except EngineError as exc:
                    _flash("error", md(str(exc)))
            st.rerun()
    classes = ds.classes()
    if not classes:
        st.info("Add a class, then images to it: uploads or camera snapshots. Two classes with a few images "
                "each can be trained.")
        return None
    for cls, files in classes.items():
        _class_panel(ds, cls, files)
    st.download_button("Download this dataset (.zip)", ds.zip_bytes, file_name=f"{Path(ds.name).name}.zip",
                       mime="application/zip", help="keep it, or upload it again with 'upload a zip'")
    return str(ds.root)
