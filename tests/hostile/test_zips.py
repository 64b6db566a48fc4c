"""Hostile zip uploads: every bad zip is one clear message naming the user's file, nothing half-extracted.

Every zip is generated here with zipfile, then damaged by patching bytes where a case needs it
(encryption flag, compression method, a flipped data byte). The app path (``extract_upload`` of a
``<sha12>_<name>.zip`` stored upload, shown under the user's name) and the CLI path
(``python -m engine train --data x.zip``) are both covered, and so is extraction under
concurrency and kill -9: a destination folder is either complete or absent.
"""
from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import engine.data.archive as archive_mod
from engine.core.errors import DataError
from engine.data.archive import MARKER, STALE_AFTER_S, ZipLimits, extract_upload
from tests.conftest import ROOT
from tests.hostile._cli import engine

SHOWN = "flowers.zip"
STORED = "0123456789ab_flowers.zip"  # how ui/uploads.save_upload stores it


# ------------------------------------------------------------------ building zips
def _png(shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 40, 80)).save(buf, format="PNG")
    return buf.getvalue()


def _info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the mode in the high 16 bits of external_attr means something
    info.external_attr = mode << 16
    return info


def _write(path: Path, entries, compression: int = zipfile.ZIP_STORED) -> Path:
    """``entries``: (name or ZipInfo, bytes) pairs; duplicates allowed (zipfile only warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


GOOD = [("cats/1.png", _png(1)), ("cats/2.png", _png(2)), ("dogs/1.png", _png(3)), ("dogs/2.png", _png(4))]


def _headers(data: bytes):
    """(central entry offset, local header offset) of every member, read from the end record."""
    eocd = data.rfind(b"PK\x05\x06")
    count = int.from_bytes(data[eocd + 10:eocd + 12], "little")
    pos = int.from_bytes(data[eocd + 16:eocd + 20], "little")
    for _ in range(count):
        n, m, k = (int.from_bytes(data[pos + o:pos + o + 2], "little") for o in (28, 30, 32))
        yield pos, int.from_bytes(data[pos + 42:pos + 46], "little")
        pos += 46 + n + m + k


def _patched(path: Path, entries, *, flag: int = 0, method: int | None = None, flip: float | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    _write(path, entries, compression)
    data = bytearray(path.read_bytes())
    for central, local in list(_headers(bytes(data))):
        if flag:
            data[central + 8] |= flag
            data[local + 6] |= flag
        if method is not None:
            data[central + 10:central + 12] = data[local + 8:local + 10] = method.to_bytes(2, "little")
    if flip is not None:  # one byte of the first member's data, at this fraction of it
        _, local = next(_headers(bytes(data)))
        start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
            int.from_bytes(data[local + 28:local + 30], "little")
        size = int.from_bytes(data[local + 18:local + 22], "little")
        data[start + int(size * flip)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _inner_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in GOOD:
            zf.writestr(name, data)
    return buf.getvalue()


def _truncated(path: Path) -> Path:
    _write(path, GOOD)
    path.write_bytes(path.read_bytes()[:-60])  # the central directory is cut off
    return path


TEXT = b"the quick brown fox jumps over the lazy dog " * 400

# id -> (builder, phrase the message must hold, limits)
BAD = {
    "not-a-zip": (lambda p: p.write_bytes(b"not a zip at all"), "not a readable zip", None),
    "truncated": (_truncated, "not a readable zip", None),
    "encrypted": (lambda p: _patched(p, GOOD, flag=0x1), "password-protected zips are not supported", None),
    "encrypted-aes-method-99": (lambda p: _patched(p, GOOD, method=99), "password-protected", None),
    "bad-crc-stored": (lambda p: _patched(p, GOOD, flip=0.5), "the zip is damaged: 'cats/1.png' fails its checksum "
                       "(CRC)", None),
    "damaged-deflate-stream": (lambda p: _patched(p, [("cats/a.txt", TEXT)] + GOOD, flip=0.0,
                                                  compression=zipfile.ZIP_DEFLATED),
                               "damaged or cut short: 'cats/a.txt' cannot be unpacked", None),
    "damaged-bzip2-stream": (lambda p: _patched(p, [("cats/a.txt", TEXT)] + GOOD, flip=0.5,
                                                compression=zipfile.ZIP_BZIP2),
                             "damaged: 'cats/a.txt' cannot be unpacked", None),
    "ppmd-compression": (lambda p: _patched(p, GOOD, method=98), "PPMd compression (method 98)", None),
    "deflate64-compression": (lambda p: _patched(p, GOOD, method=9), "Deflate64 compression", None),
    "name-too-long": (lambda p: _write(p, GOOD + [("cats/" + "a" * 300 + ".png", _png())]),
                      "has a name too long for this system (at most 255 bytes per name)", None),
    "path-too-long": (lambda p: _write(p, GOOD + [("/".join(["d" * 60] * 20) + "/x.png", _png())]),
                      "has a path too long (more than 1024 characters)", None),
    "file-and-folder-same-name": (lambda p: _write(p, [("cats", b"x")] + GOOD),
                                  "'cats' is both a file and a folder", None),
    "folder-entry-and-file-same-name": (lambda p: _write(p, [("birds/", b""), ("birds", b"x")] + GOOD),
                                        "'birds' is both a file and a folder", None),
    "duplicate-names": (lambda p: _write(p, GOOD + [("cats/1.png", _png(9))]), "'cats/1.png' appears twice", None),
    "absolute-path": (lambda p: _write(p, GOOD + [("/etc/evil.png", _png())]), "points outside", None),
    "dotdot": (lambda p: _write(p, GOOD + [("../evil.png", _png())]), "points outside", None),
    "dotdot-inside": (lambda p: _write(p, GOOD + [("cats/../../evil.png", _png())]), "points outside", None),
    "drive-letter": (lambda p: _write(p, GOOD + [("C:/evil.png", _png())]), "points outside", None),
    "backslash-dotdot": (lambda p: _write(p, GOOD + [("..\\evil.png", _png())]), "points outside", None),
    "backslash-unc": (lambda p: _write(p, GOOD + [("\\\\server\\share\\evil.png", _png())]), "points outside", None),
    "symlink-member": (lambda p: _write(p, GOOD + [(_info("cats/link.png", stat.S_IFLNK | 0o777), b"/etc/passwd")]),
                       "is a link", None),
    "fifo-member": (lambda p: _write(p, GOOD + [(_info("cats/pipe.png", stat.S_IFIFO | 0o644), b"")]),
                    "device, pipe or socket", None),
    "device-member": (lambda p: _write(p, GOOD + [(_info("cats/dev.png", stat.S_IFCHR | 0o644), b"")]),
                      "device, pipe or socket", None),
    "too-many-files": (lambda p: _write(p, GOOD + [("cats/3.png", _png(5))]), "holds 5 files; the limit is 4",
                       ZipLimits(max_files=4)),
    "too-large": (lambda p: _write(p, GOOD), "unpacks to", ZipLimits(max_total_bytes=100)),
    "zip-bomb-ratio": (lambda p: _write(p, [("cats/zeros.png", b"\0" * (20 * 1024**2))] + GOOD,
                                        zipfile.ZIP_DEFLATED), "compression ratio is implausible", None),
    "empty-zip": (lambda p: _write(p, []), "the zip is empty", None),
    "only-folders": (lambda p: _write(p, [("cats/", b""), ("dogs/", b"")]), "only folders, no files", None),
    "only-hidden-files": (lambda p: _write(p, [("__MACOSX/._1.png", b"junk"), (".DS_Store", b"x")]),
                          "only hidden or system files", None),
    "nested-zip-only": (lambda p: _write(p, [("flowers.zip", _inner_zip())]), "holds only other archives", None),
    "images-at-top-level": (lambda p: _write(p, [("1.png", _png(1)), ("2.png", _png(2)), ("3.png", _png(3))]),
                            "no class folders: its files are all at the top level", None),
}


def _stored(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "uploads" / "datasets"
    folder.mkdir(parents=True)
    return folder / STORED


def _leftovers(folder: Path, keep: Path) -> list[str]:
    """Anything in the upload folder besides the zip and its lock file."""
    lock = f".{keep.with_suffix('').name}.lock"
    return sorted(p.name for p in folder.iterdir() if p.name not in {keep.name, lock})


def _complete(root: Path, names=("cats", "dogs")) -> None:
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == list(names)
    assert sorted(p.name for p in (root / names[-1]).iterdir()) == ["1.png", "2.png"]


# ------------------------------------------------------------------ bad zips, app path
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_zip_is_one_clear_message(tmp_path, case):
    build, phrase, limits = BAD[case]
    stored = _stored(tmp_path)
    build(stored)
    with pytest.raises(DataError) as info:
        extract_upload(stored, limits or ZipLimits(), display_name=SHOWN)
    msg = str(info.value)
    assert msg.startswith(f"{SHOWN}: "), msg
    assert phrase in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    assert STORED[:12] not in msg and str(tmp_path) not in msg and ".part-" not in msg, msg
    assert _leftovers(stored.parent, stored) == []  # nothing half-extracted, no temp folder


# ------------------------------------------------------------------ good zips
def test_zip_of_one_top_folder_uses_it_as_root(tmp_path):
    stored = _write(_stored(tmp_path), [(f"flowers/{n}", d) for n, d in GOOD] + [("__MACOSX/flowers/._1.png", b"x")])
    root = extract_upload(stored, display_name=SHOWN)
    assert root == stored.with_suffix("") / "flowers"
    _complete(root)
    assert not (stored.with_suffix("") / "__MACOSX").exists()  # tool droppings are not extracted


def test_windows_backslash_names_become_folders(tmp_path):
    stored = _write(_stored(tmp_path), [(n.replace("/", "\\"), d) for n, d in GOOD])
    _complete(extract_upload(stored, display_name=SHOWN))


def test_load_source_names_the_zip_for_folder_errors(tmp_path, monkeypatch):
    import engine.data.datasets as data

    archive = _write(tmp_path / SHOWN, GOOD)

    def refuse(root):
        raise DataError(f"{Path(root).name} has no class folders.")

    monkeypatch.setattr(data, "load_folder", refuse)
    with pytest.raises(DataError) as info:
        data.load_source(str(archive), work_dir=tmp_path / "run")
    assert str(info.value) == f"{SHOWN}: has no class folders."


# ------------------------------------------------------------------ the CLI
CLI_CASES = {
    "not-a-zip": "not a readable zip",
    "encrypted": "password-protected zips are not supported",
    "images-at-top-level": "no class folders",
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=[f"cli-{c}" for c in CLI_CASES])
def test_cli_bad_zip_is_one_line_and_leaves_no_run(tmp_path, case):
    data = tmp_path / "mine"
    data.mkdir()
    BAD[case][0](data / SHOWN)
    out = tmp_path / "runs"
    ran = engine("train", "--data", str(data / SHOWN), "--epochs", "1", "--out", str(out),
                 "--model", "timm:test_resnet", "--weights", "none", "--workers", "0")
    ran.assert_one_line_error(CLI_CASES[case])
    assert ran.error_lines[0].startswith(f"error: {SHOWN}: "), ran.err
    assert not out.exists() or not [p for p in out.iterdir() if p.is_dir()], list(out.iterdir())
    assert sorted(p.name for p in data.iterdir()) == [SHOWN]  # nothing extracted beside the user's zip


# ------------------------------------------------------------------ once, atomically, concurrently
def test_complete_extraction_is_reused_not_redone(tmp_path):
    stored = _write(_stored(tmp_path), GOOD)
    root = extract_upload(stored, display_name=SHOWN)
    marker = root / MARKER
    before = marker.stat().st_ino
    os.utime(stored, ns=(1, 1))  # a new mtime with the same bytes: the sha256 still matches
    assert extract_upload(stored, display_name=SHOWN) == root
    assert marker.stat().st_ino == before


def test_half_extracted_destination_is_redone(tmp_path):
    stored = _write(_stored(tmp_path), GOOD)
    dest = stored.with_suffix("")
    (dest / "cats").mkdir(parents=True)
    (dest / "cats" / "1.png").write_bytes(b"torn")  # the old extractor died here: no marker, dogs/ missing
    (dest / ".extracted").write_text("ok")  # even the old code's marker is not trusted
    root = extract_upload(stored, display_name=SHOWN)
    _complete(root)
    assert (root / "cats" / "1.png").read_bytes() == GOOD[0][1]
    assert _leftovers(stored.parent, stored) == [dest.name]


def test_destination_of_another_archive_is_redone(tmp_path):
    stored = _write(_stored(tmp_path), GOOD)
    extract_upload(stored, display_name=SHOWN)
    _write(stored, [(n.replace("cats", "birds"), d) for n, d in GOOD] + [("birds/3.png", _png(7))])
    root = extract_upload(stored, display_name=SHOWN)
    _complete(root, ("birds", "dogs"))
    assert len(list((root / "birds").iterdir())) == 3
    assert json.loads((root / MARKER).read_text())["size"] == stored.stat().st_size


def test_stale_temp_and_trash_folders_are_cleaned(tmp_path, monkeypatch):
    stored = _write(_stored(tmp_path), GOOD)
    stale = [stored.parent / f".{stored.with_suffix('').name}.{kind}-abcd1234" for kind in ("part", "old")]
    for folder in stale:
        (folder / "cats").mkdir(parents=True)
        old = time.time() - STALE_AFTER_S - 60
        os.utime(folder, (old, old))
    monkeypatch.setattr(archive_mod, "fcntl", None)  # even without a lock, old leftovers go
    _complete(extract_upload(stored, display_name=SHOWN))
    assert not any(p.exists() for p in stale)


def _race(stored, n: int = 4) -> list:
    """``n`` threads released at the same instant, each extracting the same upload."""
    barrier = threading.Barrier(n)

    def go(_):
        barrier.wait()
        return extract_upload(stored, display_name=SHOWN)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_threads_extracting_at_once_share_one_result(tmp_path):
    stored = _write(_stored(tmp_path), GOOD)
    roots = _race(stored)
    assert len(set(roots)) == 1
    _complete(roots[0])
    assert _leftovers(stored.parent, stored) == [stored.with_suffix("").name]


def test_threads_without_a_lock_still_publish_once(tmp_path, monkeypatch):
    """Crash safety rests on the rename, not the lock: with no flock at all, racers still agree."""
    monkeypatch.setattr(archive_mod, "fcntl", None)
    stored = _write(_stored(tmp_path), _many(300))  # long enough that the racers' renames collide
    roots = _race(stored)
    assert len(set(roots)) == 1
    assert sum(1 for p in roots[0].rglob("*.png")) == 300
    assert _leftovers(stored.parent, stored) == [stored.with_suffix("").name]


EXTRACT = ("import sys, time, pathlib\n"
           "from engine.data.archive import extract_upload\n"
           "go = pathlib.Path(sys.argv[2])\n"
           "while not go.exists(): time.sleep(0.001)\n"
           "print(extract_upload(sys.argv[1], display_name='flowers.zip'))\n")


def _extractor(stored: Path, go: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(stored), str(go)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _many(n: int = 1500):
    return [(f"c{i % 2}/{i}.png", b"x" * 64) for i in range(n)]


def test_two_processes_extracting_at_once_share_one_result(tmp_path):
    stored = _write(_stored(tmp_path), _many())
    go = tmp_path / "go"
    procs = [_extractor(stored, go) for _ in range(2)]
    time.sleep(0.3)  # both started and polling
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    roots = {out.strip() for out, _ in results}
    assert roots == {str(stored.with_suffix(""))}
    assert sum(1 for p in stored.with_suffix("").rglob("*.png")) == 1500
    assert _leftovers(stored.parent, stored) == [stored.with_suffix("").name]


@pytest.mark.parametrize("point", ["mid", "before-rename"], ids=["kill-9-mid-extraction", "kill-9-before-rename"])
def test_kill_9_while_extracting_never_leaves_a_usable_half(tmp_path, point):
    stored = _write(_stored(tmp_path), _many(200))
    go = tmp_path / "go"
    go.touch()
    proc = _extractor(stored, go, env={"WORKBENCH_FAULT": f"kill:{MARKER}:{point}:1"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    dest = stored.with_suffix("")
    assert not dest.exists()  # never published
    assert [n for n in _leftovers(stored.parent, stored) if ".part-" in n]  # the dead one's temp folder
    root = extract_upload(stored, display_name=SHOWN)
    assert sum(1 for p in root.rglob("*.png")) == 200
    assert _leftovers(stored.parent, stored) == [dest.name]  # its temp folder cleaned (the lock proves it dead)


def test_kill_9_at_a_random_moment_leaves_complete_or_nothing(tmp_path):
    stored = _write(_stored(tmp_path), _many(3000))
    dest = stored.with_suffix("")
    go = tmp_path / "go"
    go.touch()
    proc = _extractor(stored, go)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and \
            not any(stored.parent.glob(".*.part-*/c0/*.png")):
        time.sleep(0.002)  # wait until it is writing files
    time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if dest.exists():  # it won the race: then it is complete
        assert sum(1 for p in dest.rglob("*.png")) == 3000 and (dest / MARKER).is_file()
    root = extract_upload(stored, display_name=SHOWN)
    assert sum(1 for p in root.rglob("*.png")) == 3000
    assert _leftovers(stored.parent, stored) == [dest.name]


def test_save_upload_rewrites_a_torn_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    from ui.uploads import save_upload

    data = _inner_zip()
    first = save_upload(data, "my flowers.zip", "datasets")
    assert first.name.endswith("_myflowers.zip") and first.read_bytes() == data
    first.write_bytes(data[:10])  # the old non-atomic write died half-way
    assert save_upload(data, "my flowers.zip", "datasets") == first and first.read_bytes() == data
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
