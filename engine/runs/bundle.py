"""Run bundles: one zip that carries a finished run to another machine, and back in safely.

Streamlit Community Cloud wipes its disk on every restart, so a run worth keeping must leave as a
single file and come back on another server. A bundle holds what evaluating, predicting and
reproducing a run need: ``config.json``, ``metrics.jsonl``, ``status.json`` (its final state),
``best.safetensors`` + ``best.json`` (weights with classes and preprocessing in the safetensors
header), ``reproduce.py`` (the plain PyTorch script, as text), ``events.jsonl`` when small, and a
``bundle.json`` manifest with the size and sha256 of every file. It never holds ``last_state.pt``
(the optimizer state is a torch pickle) nor ``log.txt``: a bundled run can be evaluated, used for
predictions and reproduced, not resumed.

An imported bundle is an upload like any other: untrusted. Nothing in it is ever executed or
unpickled: sizes and the member list are checked from the zip's directory first, every byte is
counted and hashed while it is unpacked into a private folder, the weights are opened with
safetensors only, the config goes through ``TrainConfig``; one rename publishes the run when all
of it holds. A refusal is one ``BundleError`` line that names the user's file, and leaves nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterator

from engine.core.errors import EngineError, RunError, printable
from engine.core.files import JsonBoundsError, atomic_write_json, check_output_file, file_lock, loads_bounded
from engine.core.paths import lock_dir
from engine.data.layouts import MAX_LABEL, usable_class_name
from engine.runs.checkpoint_file import head_classes, load_weights, weights_meta
from engine.runs.metrics_file import FILLED as METRICS_FILLED
from engine.runs.metrics_file import REQUIRED as METRICS_REQUIRED
from engine.runs.metrics_file import text_problem
from engine.runs.open_set import MAX_FILE_BYTES as MAX_OPEN_SET_BYTES
from engine.runs.open_set import OPEN_SET_FILE, run_open_set
from engine.runs.status import RunStatus
from engine.runs.store import RunDir

FORMAT = 1  # bump when a reader of the old format could misread a new bundle
KIND = "transfer-workbench run bundle"
MANIFEST = "bundle.json"
SCRIPT = "reproduce.py"
WEIGHTS = "best.safetensors"
REQUIRED = ("config.json", "status.json", "metrics.jsonl", WEIGHTS, "best.json", SCRIPT)
# the decisions about single images it trained with; the open-set rule (engine/runs/open_set.py)
OPTIONAL = ("events.jsonl", "data-overrides.json", OPEN_SET_FILE)
MEMBERS = frozenset((MANIFEST, *REQUIRED, *OPTIONAL))
FINAL_STATES = ("finished", "cancelled", "failed", "diverged", "interrupted")
IDENTITY = ("config.json", WEIGHTS, "metrics.jsonl")  # what makes two copies of a run the same run
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
STALE_AFTER_S = 15 * 60  # an import folder this old belongs to a dead importer
_PART_PREFIX = ".bundle-import-"
METRIC_KEYS = (*METRICS_REQUIRED, *METRICS_FILLED)


class BundleError(RunError):
    """A run cannot be bundled, or a bundle cannot be imported; the message names the user's file."""


@dataclass(frozen=True)
class BundleLimits:
    """What an imported bundle may hold (a real one is a few files; weights dominate its size)."""

    max_members: int = 16
    max_total_bytes: int = 2 * 1024**3 + 256 * 1024**2
    max_weights_bytes: int = 2 * 1024**3
    max_json_bytes: int = 4 * 1024**2  # config.json, status.json, best.json, bundle.json
    max_text_bytes: int = 64 * 1024**2  # metrics.jsonl, events.jsonl, reproduce.py
    max_ratio: float = 200.0  # uncompressed / compressed, beyond this it is a zip bomb
    ratio_from_bytes: int = 1024**2  # small members compress as they like
    events_export_bytes: int = 4 * 1024**2  # a longer events.jsonl stays out of an export

    def member_limit(self, name: str) -> int:
        if name == OPEN_SET_FILE:
            return MAX_OPEN_SET_BYTES
        if name.endswith(".safetensors"):
            return self.max_weights_bytes
        return self.max_json_bytes if name.endswith(".json") else self.max_text_bytes


# ------------------------------------------------------------------ export
def check_exportable(run: RunDir) -> None:
    """Refuse what a bundle could not carry whole: an active run, a damaged one, one without weights."""
    status = run.status()
    if status.active:
        raise BundleError(f"Run {run.run_id} is still {status.state}; wait for it to end (or cancel it), "
                          "then export it.")
    problems = run.problems()
    if problems:
        raise BundleError(f"Run {run.run_id} is damaged ({'; '.join(problems)}); it cannot be exported.")
    if not run.checkpoint("best").is_file():
        raise BundleError(f"Run {run.run_id} has no best checkpoint yet (no epoch finished); "
                          "there is nothing to export.")


def write_bundle(run: RunDir, out: IO[bytes], *, script_for: Callable[[RunDir], str],
                 limits: BundleLimits = BundleLimits()) -> dict[str, Any]:
    """Write the bundle of ``run`` into ``out``; returns its manifest.

    ``script_for`` makes the reproduce script (``engine.outputs.code.script_for_run``): it is
    passed in because the script generator sits on a higher layer than run folders.
    """
    check_exportable(run)
    status = run.status()
    try:
        script = script_for(run)
    except EngineError as exc:  # e.g. data the script cannot read: the bundle says why instead
        script = f"# {exc}\nraise SystemExit({str(exc)!r})\n"
    files: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("config.json", "metrics.jsonl", WEIGHTS):
            files[name] = _add_file(zf, run.path / name, name)
        sidecar = run.checkpoint("best").with_suffix(".json")
        if sidecar.is_file():
            files["best.json"] = _add_file(zf, sidecar, "best.json")
        else:  # the meta lives in the weights file; the JSON copy beside it is for people, rebuilt here
            files["best.json"] = _add_bytes(zf, "best.json", _json_bytes(run.checkpoint_meta("best")))
        if 0 < _size_of(run.events_path) <= limits.events_export_bytes:
            files["events.jsonl"] = _add_file(zf, run.events_path, "events.jsonl")
        if run_open_set(run) is not None:  # a valid rule of the current best checkpoint: predictions use it
            files[OPEN_SET_FILE] = _add_file(zf, run.path / OPEN_SET_FILE, OPEN_SET_FILE)
        if _has_decisions(run):  # so the imported run reads its data as it trained on it (engine.data.overrides)
            files["data-overrides.json"] = _add_file(zf, run.path / "data-overrides.json", "data-overrides.json")
        files["status.json"] = _add_bytes(zf, "status.json", _json_bytes(status.to_dict()))
        files[SCRIPT] = _add_bytes(zf, SCRIPT, script.encode("utf-8"))
        manifest = _manifest(run, files)
        zf.writestr(MANIFEST, _json_bytes(manifest))
    return manifest


def _has_decisions(run: RunDir) -> bool:
    """Whether the run trained with decisions about single images (a bundle without any stays readable
    by a workbench that predates them)."""
    from engine.data.overrides import run_overrides

    return bool(run_overrides(run.path).decisions)


def export_bundle(run: RunDir, *, script_for: Callable[[RunDir], str]) -> bytes:
    """The bundle as bytes (a download button); see ``write_bundle``."""
    buf = io.BytesIO()
    write_bundle(run, buf, script_for=script_for)
    return buf.getvalue()


def export_bundle_file(run: RunDir, target: str | Path, *, script_for: Callable[[RunDir], str]) -> dict[str, Any]:
    """Write the bundle to ``target`` atomically: a failed export never leaves half a zip there."""
    target = Path(target)
    if target.is_dir():
        raise BundleError(f"{target} is a folder; name the file to write, e.g. {target / (run.run_id + '.zip')}.")
    if not target.parent.is_dir():
        raise BundleError(f"The folder of {target} does not exist.")
    check_output_file(target, run.path.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            manifest = write_bundle(run, fh, script_for=script_for)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # readable as any file the user writes (mkstemp's is private)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _manifest(run: RunDir, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import engine

    versions = {"engine": getattr(engine, "__version__", None)}
    for package in ("torch", "timm", "torchvision", "safetensors"):
        versions[package] = _version(package)
    return {"kind": KIND, "format": FORMAT, "run_id": run.run_id, "exported_at": time.time(),
            "versions": versions, "files": dict(sorted(files.items()))}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _add_file(zf: zipfile.ZipFile, path: Path, name: str) -> dict[str, Any]:
    """Stream one file into the zip, hashing exactly the bytes written (weights stored, not deflated)."""
    digest, size = hashlib.sha256(), 0
    method = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
    info = zipfile.ZipInfo(name, date_time=time.localtime(time.time())[:6])
    info.compress_type, info.external_attr = method, (stat.S_IFREG | 0o644) << 16
    with _open_or_empty(path) as src, zf.open(info, "w", force_zip64=True) as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _open_or_empty(path: Path) -> IO[bytes]:
    """metrics.jsonl is absent until an epoch ends; a missing one is bundled empty."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        return io.BytesIO()


def _add_bytes(zf: zipfile.ZipFile, name: str, data: bytes) -> dict[str, Any]:
    info = zipfile.ZipInfo(name, date_time=time.localtime(time.time())[:6])
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, (stat.S_IFREG | 0o644) << 16
    zf.writestr(info, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


# ------------------------------------------------------------------ import
def import_bundle(source: str | Path | bytes, runs_root: str | Path, *, display_name: str | None = None,
                  limits: BundleLimits = BundleLimits()) -> RunDir:
    """Import a bundle into ``runs_root`` and return the run; nothing in it is executed or unpickled.

    The same bundle imported again returns the run already there. Another run holding its id is
    never touched: the import gets the id ``<id>-imported-<hex>``. ``display_name`` is the name the
    user knows the file by (an upload is stored under another), used in every message.
    """
    shown = _shown(source, display_name)
    root = Path(runs_root)
    if root.exists() and not root.is_dir():
        raise BundleError(f"The runs folder {root.name} is a file, not a folder.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_dead_imports(root)
        work = Path(tempfile.mkdtemp(prefix=_PART_PREFIX, suffix=".part", dir=root))
        try:
            staged = work / "run"  # one level down: list_runs never sees a half-imported run
            staged.mkdir()
            manifest = _unpack(source, staged, shown, limits)
            _check_contents(staged, manifest, shown)
            _write_imported_status(staged, manifest, shown)
            _check_health(staged, shown)
            return _publish(staged, root, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # empty once published
    except OSError as exc:  # the disk, not the bundle: still one line, without server paths
        raise BundleError(f"{shown}: could not be imported ({exc.strerror or type(exc).__name__}).") from exc


def _shown(source: str | Path | bytes, display_name: str | None) -> str:
    """The file's name as the user knows it (never a folder), fit for one line."""
    if display_name:
        return _printable(Path(display_name).name, 100) or "the bundle"
    return "the bundle" if isinstance(source, (bytes, bytearray)) else _printable(Path(source).name, 100)


def _unpack(source: str | Path | bytes, into: Path, shown: str, limits: BundleLimits) -> dict[str, Any]:
    """Every check the zip's directory allows, then each member unpacked, counted and hashed."""
    with _open_zip(source, shown) as zf:
        manifest = _read_manifest(zf, shown, limits)
        members = _check_members(zf, manifest, shown, limits)
        for m in members:
            if m.filename != MANIFEST:
                _extract(zf, m, into / m.filename, manifest["files"][m.filename], shown)
    return manifest


def _open_zip(source: str | Path | bytes, shown: str) -> zipfile.ZipFile:
    if isinstance(source, (bytes, bytearray)):
        fh: Any = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise BundleError(f"{shown}: no such file.")
        if not path.is_file():
            raise BundleError(f"{shown}: is not a file (a run bundle is a .zip file).")
        fh = path
    try:
        return zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise BundleError(f"{shown}: not a readable zip file (damaged, cut short, or another format); "
                          "export the run again.") from exc


def _read_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, limit: int, shown: str) -> bytes:
    """A small member's bytes, never more than ``limit`` whatever its header claims."""
    with _reading(shown, m.filename), zf.open(m) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{shown}: '{m.filename}' is larger than {_size(limit)}; refused.")
    return data


def _read_manifest(zf: zipfile.ZipFile, shown: str, limits: BundleLimits) -> dict[str, Any]:
    """bundle.json: what this bundle claims to hold. Checked here; the files are checked against it."""
    try:
        info = zf.getinfo(MANIFEST)
    except KeyError:
        raise BundleError(f"{shown}: not a run bundle (it has no {MANIFEST}); export the run with "
                          "'Run bundle (.zip)' or `python -m engine runs export`.") from None
    _check_entry(info, shown)
    if info.file_size > limits.max_json_bytes:
        raise BundleError(f"{shown}: {MANIFEST} is larger than {_size(limits.max_json_bytes)}; refused.")
    manifest = _parse_json(_read_member(zf, info, limits.max_json_bytes, shown), MANIFEST, shown)
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{shown}: {MANIFEST} does not describe a run bundle.")
    version = manifest.get("format")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT:
        raise BundleError(f"{shown}: made by a newer version of the workbench (bundle format {_printable(str(version), 20)}); "
                          "update this one to import it.")
    if version != FORMAT:
        raise BundleError(f"{shown}: {MANIFEST} has an unknown bundle format ({str(version)[:20]}).")
    run_id = manifest.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise BundleError(f"{shown}: {MANIFEST} names no usable run id.")
    manifest["files"] = _manifest_files(manifest.get("files"), shown)
    return manifest


def _manifest_files(files: Any, shown: str) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise BundleError(f"{shown}: {MANIFEST} lists no files.")
    for name, entry in files.items():
        if name not in MEMBERS or name == MANIFEST:
            raise BundleError(f"{shown}: {MANIFEST} lists '{_printable(str(name))}', which is not part of a run "
                              "bundle.")
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise BundleError(f"{shown}: {MANIFEST} has no valid size and sha256 for '{name}'.")
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise BundleError(f"{shown}: incomplete: {', '.join(missing)} missing; export the run again.")
    return files


def _check_entry(m: zipfile.ZipInfo, shown: str) -> None:
    """One zip entry: a plain, flat, readable file, or refused before anything is written."""
    name = m.filename
    shown_name = _printable(name)
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise BundleError(f"{shown}: the entry '{shown_name}' points outside the bundle; refused.")
    mode = m.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(f"{shown}: the entry '{shown_name}' is a link; refused.")
    if m.is_dir() or stat.S_ISDIR(mode) or len(path.parts) != 1:
        raise BundleError(f"{shown}: the entry '{shown_name}' is in a folder; a run bundle holds its files "
                          "at the top level only.")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise BundleError(f"{shown}: the entry '{shown_name}' is not a plain file; refused.")
    if m.flag_bits & 0x1:
        raise BundleError(f"{shown}: '{shown_name}' is encrypted; a run bundle is never password-protected.")
    if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BundleError(f"{shown}: '{shown_name}' uses an unusual compression (method {m.compress_type}); "
                          "export the run again.")


def _check_members(zf: zipfile.ZipFile, manifest: dict[str, Any], shown: str,
                   limits: BundleLimits) -> list[zipfile.ZipInfo]:
    """The zip's directory against the manifest and the limits, before a byte is unpacked."""
    members = zf.infolist()
    if len(members) > limits.max_members:
        raise BundleError(f"{shown}: holds {len(members)} entries; a run bundle has at most {limits.max_members}.")
    seen: set[str] = set()
    for m in members:
        _check_entry(m, shown)
        if m.filename not in MEMBERS:
            raise BundleError(f"{shown}: the entry '{_printable(m.filename)}' is not part of a run bundle; "
                              "refused.")
        if m.filename in seen:
            raise BundleError(f"{shown}: '{m.filename}' appears twice; refused.")
        seen.add(m.filename)
    files = manifest["files"]
    for name in sorted(set(files) - seen):
        raise BundleError(f"{shown}: '{name}' is listed in {MANIFEST} but missing; export the run again.")
    for name in sorted(seen - set(files) - {MANIFEST}):
        raise BundleError(f"{shown}: '{name}' is not listed in {MANIFEST}; refused.")
    _check_sizes(members, files, shown, limits)
    return members


def _check_sizes(members: list[zipfile.ZipInfo], files: dict[str, dict[str, Any]], shown: str,
                 limits: BundleLimits) -> None:
    total = 0
    for m in members:
        limit = limits.member_limit(m.filename)
        declared = max(m.file_size, files.get(m.filename, {}).get("size", 0))
        if declared > limit:
            raise BundleError(f"{shown}: '{m.filename}' unpacks to {_size(declared)}; the limit is {_size(limit)}.")
        if m.file_size > limits.ratio_from_bytes and m.file_size / max(m.compress_size, 1) > limits.max_ratio:
            raise BundleError(f"{shown}: '{m.filename}' has an implausible compression ratio (a zip bomb?); refused.")
        if m.filename in files and m.file_size != files[m.filename]["size"]:
            raise BundleError(f"{shown}: '{m.filename}' does not have the size {MANIFEST} gives it; "
                              "the bundle was changed or damaged.")
        total += declared
    if total > limits.max_total_bytes:
        raise BundleError(f"{shown}: unpacks to {_size(total)}; the limit is {_size(limits.max_total_bytes)}.")


def _extract(zf: zipfile.ZipFile, m: zipfile.ZipInfo, target: Path, expected: dict[str, Any], shown: str) -> None:
    """Unpack one member, counting and hashing the real bytes (a header may lie about its size)."""
    digest, written = hashlib.sha256(), 0
    with _reading(shown, m.filename), zf.open(m) as src, open(target, "xb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > expected["size"]:
                raise BundleError(f"{shown}: '{m.filename}' unpacks to more than it declares; refused.")
            digest.update(chunk)
            out.write(chunk)
    if written != expected["size"] or digest.hexdigest() != expected["sha256"]:
        raise BundleError(f"{shown}: '{m.filename}' does not match its sha256 in {MANIFEST}; the bundle was "
                          "changed or damaged.")


@contextmanager
def _reading(shown: str, name: str) -> Iterator[None]:
    """What unpacking a member can raise, as the one line the user sees (disk errors pass through)."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise BundleError(f"{shown}: the zip is damaged or cut short ('{name}' cannot be unpacked); "
                          "export the run again.") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise  # the disk, not the bundle: import_bundle words it
        raise BundleError(f"{shown}: the zip is damaged ('{name}' cannot be unpacked); "  # a decompressor's complaint
                          "export the run again.") from exc


def _parse_json(data: bytes, name: str, shown: str) -> Any:
    try:
        return loads_bounded(data)
    except JsonBoundsError as exc:
        raise BundleError(f"{shown}: '{name}' is not valid JSON for a run bundle ({exc}); refused.") from None
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{shown}: '{name}' is not valid JSON; refused.") from None


# ------------------------------------------------------------------ what the files say
def _check_contents(staged: Path, manifest: dict[str, Any], shown: str) -> None:
    """Each file parses as what it claims to be; config, classes and weights agree with each other."""
    for name in manifest["files"]:
        if name.endswith(".json"):
            _parse_json((staged / name).read_bytes(), name, shown)
        elif not name.endswith(".safetensors"):
            try:
                (staged / name).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"{shown}: '{name}' is not text; refused.") from None
    config = _parse_json((staged / "config.json").read_bytes(), "config.json", shown)
    _check_config(config, shown)
    best = _parse_json((staged / "best.json").read_bytes(), "best.json", shown)
    if not isinstance(best, dict):
        raise BundleError(f"{shown}: 'best.json' is not a JSON object; refused.")
    _check_weights(staged / WEIGHTS, best, shown, config.get("model"))
    metrics = text_problem((staged / "metrics.jsonl").read_bytes().decode("utf-8"))
    if metrics:  # every page reads these rows: one of another shape broke the Runs page for everyone
        raise BundleError(f"{shown}: {metrics}; a run's metrics rows hold {', '.join(METRIC_KEYS)}; refused.")
    epochs = len(RunDir(staged).metrics())  # every run list reads them: no more than the run trained
    if epochs > int(config.get("epochs") or 0):
        raise BundleError(f"{shown}: metrics.jsonl has {epochs} epochs, more than the {config.get('epochs')} its "
                          "config.json trains; refused.")
    if (staged / "data-overrides.json").is_file():  # what evaluation reads the data with: refused now, not then
        from engine.data.overrides import read_file

        try:
            read_file(staged / "data-overrides.json")
        except EngineError:
            raise BundleError(f"{shown}: 'data-overrides.json' is not a list of decisions about images; "
                              "refused.") from None


def _check_config(config: Any, shown: str) -> None:
    from engine.config import TrainConfig

    if not isinstance(config, dict):
        raise BundleError(f"{shown}: 'config.json' is not a JSON object; refused.")
    try:
        TrainConfig.from_dict(config)  # validates every setting
    except (EngineError, TypeError, ValueError) as exc:
        raise BundleError(f"{shown}: 'config.json' is not a valid run config: {_one_line(exc)}") from None


def _check_weights(path: Path, sidecar: dict[str, Any], shown: str, config_model: str | None = None) -> None:
    """Opened with safetensors (never torch.load): classes present, printable, distinct, one per head
    row; preprocessing in range; the model the config names; the model's tensors."""
    from engine.models.factory import ModelSpec, sane_preprocessing

    try:
        meta = weights_meta(path)
    except RunError:
        raise BundleError(f"{shown}: '{WEIGHTS}' is not a safetensors file (damaged, or a pickle, which is "
                          "never loaded); refused.") from None
    meta = meta if meta is not None else sidecar
    names = meta.get("class_names")
    if not (isinstance(names, list) and len(names) >= 1 and all(isinstance(n, str) for n in names)):
        raise BundleError(f"{shown}: the weights carry no class names; refused.")
    bad = next((n for n in names if not usable_class_name(n)), None)
    if bad is not None:  # printed by predict and eval: an escape sequence or a newline would forge output
        raise BundleError(f"{shown}: a class name is empty, over {MAX_LABEL} characters or holds control "
                          f"characters ('{_printable(bad, 40)}'); refused.")
    if len(set(names)) != len(names):
        raise BundleError(f"{shown}: its class names repeat ('{_printable(_first_repeat(names), 40)}'); refused.")
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BundleError(f"{shown}: the weights carry no readable model description; refused.") from None
    if sane_preprocessing(meta["spec"]) is None:
        raise BundleError(f"{shown}: the weights' preprocessing (input size, mean/std, crop, interpolation) is "
                          "out of range; refused.")
    rows = head_classes(path, str(spec.head))
    if rows is None or rows != len(names) or spec.num_classes != len(names):
        raise BundleError(f"{shown}: the weights' head predicts {rows if rows is not None else 'no'} classes but "
                          f"{len(names)} class names are given; refused.")
    if list(spec.class_names) != list(names):
        raise BundleError(f"{shown}: the weights' model description and their class names differ; refused.")
    _check_tensors(path, spec, shown)
    if config_model is not None and _qualified(config_model) != spec.name:
        raise BundleError(f"{shown}: config.json names {_printable(config_model, 40)} but the weights are "
                          f"{_printable(spec.name, 40)}; refused.")


def _check_tensors(path: Path, spec: Any, shown: str) -> None:
    """The model is sized from metadata first (catalog count, meta build: engine.models.sizing) against
    the memory budget and the hosted caps; then the header's tensor names and shapes must be exactly
    the model's (no tensor data is read, no real model built); then the weights, loaded, must give
    finite outputs on a probe image."""
    from safetensors import safe_open

    from engine.models.factory import check_finite_outputs, model_from_spec
    from engine.models.sizing import check_fits, meta_state_shapes

    try:
        meta = check_fits(spec)
        expected = meta_state_shapes(meta if meta is not None else model_from_spec(spec).module)
    except (EngineError, TypeError, ValueError, AttributeError) as exc:  # a name that is not text, ...
        raise BundleError(f"{shown}: its model cannot be built here: {_one_line(exc)}") from None
    try:
        with safe_open(str(path), "pt") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise BundleError(f"{shown}: '{WEIGHTS}' is damaged; refused.") from None
    wrong = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if wrong:
        raise BundleError(f"{shown}: '{WEIGHTS}' does not fit {spec.name} ({len(wrong)} tensors differ, e.g. "
                          f"'{_printable(wrong[0], 60)}'); refused.")
    try:
        check_finite_outputs(model_from_spec(spec, load_weights(path)), f"'{WEIGHTS}'")
    except EngineError as exc:
        raise BundleError(f"{shown}: {_one_line(exc)}") from None


def _write_imported_status(staged: Path, manifest: dict[str, Any], shown: str) -> None:
    """Its final state, where it came from, and nothing of the process that trained it elsewhere."""
    bundled = RunStatus.from_dict(_parse_json((staged / "status.json").read_bytes(), "status.json", shown))
    state = bundled.state if bundled.state in FINAL_STATES else "finished"
    now = time.time()
    exported = manifest.get("exported_at")
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    engine_version = versions.get("engine")
    origin = {"bundle": shown, "run_id": manifest["run_id"], "imported_at": now,
              "exported_at": exported if isinstance(exported, (int, float)) and not isinstance(exported, bool) else None,
              "engine_version": engine_version[:40] if isinstance(engine_version, str) else None}
    reason = bundled.reason
    if state != "finished" and "resume" in reason:  # "...; resume it" was true where it trained, not here
        reason = (reason.split(";")[0] + "; imported as a bundle, which carries its best weights, not the "
                  "training state: it cannot be resumed here")
    status = replace(bundled, state=state, reason=reason[:500], pid=None, pid_start=None, heartbeat=None,
                     imported_from=origin, updated_at=now)
    atomic_write_json(staged / "status.json", status.to_dict())


def _check_health(staged: Path, shown: str) -> None:
    """The run as every page will see it: the same checks that list a folder as damaged."""
    problems = RunDir(staged).problems()
    if problems:
        raise BundleError(f"{shown}: the run it holds is damaged ({'; '.join(problems)}); refused.")


# ------------------------------------------------------------------ publishing
def _publish(staged: Path, root: Path, manifest: dict[str, Any]) -> RunDir:
    """One rename puts the run in place, under a lock so two imports never race for one id."""
    run_id = manifest["run_id"]
    with file_lock(lock_dir() / f"bundle-import-{_root_key(root)}.lock"):
        for candidate in _same_id_runs(root, run_id):
            if _same_run(candidate, manifest["files"]):
                return RunDir(candidate)  # this bundle was imported (or trained here) already
        target = root / run_id
        while target.exists() or target.is_symlink():
            target = root / f"{run_id}-imported-{secrets.token_hex(3)}"
        os.rename(staged, target)
    return RunDir(target)


def _root_key(root: Path) -> str:
    return hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


def _same_id_runs(root: Path, run_id: str) -> Iterator[Path]:
    first = root / run_id
    if first.is_dir() and not first.is_symlink():
        yield first
    for path in sorted(root.glob(f"{run_id}-imported-*")):
        if path.is_dir() and not path.is_symlink():
            yield path


def _same_run(folder: Path, files: dict[str, dict[str, Any]]) -> bool:
    """The same config, weights and curves as the bundle (status and script may differ)."""
    for name in IDENTITY:
        path, entry = folder / name, files[name]
        if _size_of(path) != entry["size"] or _sha256(path) != entry["sha256"]:  # size first: cheap
            return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        pass
    return digest.hexdigest()


def _sweep_dead_imports(root: Path) -> None:
    """Import folders a killed importer left behind (old enough that no import is still writing)."""
    now = time.time()
    for path in root.glob(f"{_PART_PREFIX}*.part"):
        try:
            if now - path.lstat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _qualified(model: str) -> str:
    from engine.models.registry import resolve

    try:
        return resolve(model).qualified
    except EngineError:
        return model


def _first_repeat(names: list[str]) -> str:
    seen: set[str] = set()
    return next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]


# ------------------------------------------------------------------ words
def _printable(text: str, limit: int = 60) -> str:
    """A name from a zip, as one short line: control characters never reach a message."""
    clean = printable(text)
    return clean[:limit] + ("..." if len(clean) > limit else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
