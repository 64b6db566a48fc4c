"""Run bundles: a real run leaves as one zip and comes back on another runs folder, whole and checked.

Round trip on a real tiny training (evaluation and predictions identical), idempotent re-import, an
id clash, refused exports, and a hostile corpus of bundles: each refused in one line that names the
user's file, with nothing left in the runs folder and nothing in the bundle ever executed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import struct
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine.core.errors import EngineError, RunError
from engine.outputs.code import script_for_run
from engine.outputs.evaluate import evaluate_run
from engine.outputs.predict import predict_files
from engine.runs.bundle import BundleError, BundleLimits, export_bundle, import_bundle
from engine.runs.calibration import run_temperature
from engine.runs.load import load_run_model
from engine.runs.process import process_start
from engine.runs.status import RunStatus
from engine.runs.store import list_runs, open_run, usable_runs
from tests.conftest import ROOT, tiny_lfw_run
from tests.hostile._cli import engine

EVIL = "evil.zip"


# ------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (tiny model, LFW faces)."""
    return tiny_lfw_run(tmp_path_factory.mktemp("source-runs"), run_id="20240101-000000-tiny")


@pytest.fixture(scope="module")
def bundle(trained) -> bytes:
    return export_bundle(trained, script_for=script_for_run)


def _copy_run(run, root: Path, run_id: str | None = None):
    shutil.copytree(run.path, root / (run_id or run.run_id))
    return open_run(root, run_id or run.run_id)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _probs(run, photo) -> list[tuple[str, float]]:
    """What ``predict --run`` shows: the calibrated probabilities (the run's temperature, engine/runs/calibration.py)."""
    [result] = predict_files(load_run_model(run.path), [photo], top_k=2, temperature=run_temperature(run))
    return [(t.label, t.prob) for t in result.topk]


# ------------------------------------------------------------------ what a bundle holds
def test_a_bundle_holds_the_run_and_no_pickle(trained, bundle):
    zf = zipfile.ZipFile(io.BytesIO(bundle))
    names = set(zf.namelist())
    assert names == {"bundle.json", "config.json", "status.json", "metrics.jsonl", "best.safetensors", "best.json",
                     "reproduce.py", "events.jsonl", "open-set.safetensors"}
    assert not any(n.endswith((".pt", ".pth", ".pkl")) or n == "log.txt" for n in names)
    manifest = json.loads(zf.read("bundle.json"))
    assert manifest["run_id"] == trained.run_id and manifest["format"] == 1
    assert manifest["versions"]["engine"] and manifest["versions"]["torch"]
    for name, entry in manifest["files"].items():
        data = zf.read(name)
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert zf.read("best.safetensors") == trained.checkpoint("best").read_bytes()
    assert zf.read("config.json") == trained.config_path.read_bytes()
    assert zf.read("reproduce.py").decode() == script_for_run(trained)
    assert json.loads(zf.read("status.json"))["state"] == "finished"


# ------------------------------------------------------------------ round trip
def test_round_trip_evaluates_and_predicts_the_same(trained, bundle, tmp_path, cat_photo):
    other = tmp_path / "other-machine"
    run = import_bundle(bundle, other, display_name="tiny.zip")
    assert run.run_id == trained.run_id and run.path.parent == other
    assert run.problems() == []
    assert [r.run_id for r in usable_runs(other)] == [trained.run_id]
    assert sorted(p.name for p in other.iterdir()) == [trained.run_id]  # no temp folder left
    assert not run.train_state_path.exists() and not run.log_path.exists()
    status = run.status()
    assert status.state == "finished" and status.pid is None and status.heartbeat is None
    assert status.imported_from["bundle"] == "tiny.zip" and status.imported_from["run_id"] == trained.run_id
    assert status.best_val_acc == trained.status().best_val_acc
    assert run.metrics() == trained.metrics()
    assert (run.path / "reproduce.py").read_text() == script_for_run(trained)

    before, after = evaluate_run(trained), evaluate_run(run)
    assert after.val_images == before.val_images > 0
    assert (after.val_acc, after.val_loss, after.per_class_acc) == (before.val_acc, before.val_loss,
                                                                    before.per_class_acc)
    assert _probs(run, cat_photo) == _probs(trained, cat_photo)


def test_an_imported_run_reads_no_data_outside_the_data_folder(bundle, tmp_path, monkeypatch, cat_photo):
    """Its config's data path was written on another machine: /usr, say, would be scanned as a dataset
    and its folder names shown as classes. Built-in data and the data folder are read; nothing else."""
    from engine.core.errors import DataError

    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    run = import_bundle(_config(data="/usr")(bundle), tmp_path / "runs")
    with pytest.raises(DataError, match=r"imported from another machine, and its data path \(/usr\) is outside"):
        evaluate_run(run)
    assert predict_files(load_run_model(run.path), [cat_photo])  # predictions need no data


def test_an_imported_unfinished_run_does_not_say_resume_it(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "source")
    run.write_status(state="interrupted",
                     reason="the training process ended without finishing (crash or kill); resume it")
    imported = import_bundle(export_bundle(run, script_for=script_for_run), tmp_path / "runs")
    status = imported.status()
    assert status.state == "interrupted" and "cannot be resumed here" in status.reason
    assert "; resume it" not in status.reason
    with pytest.raises(RunError, match="carries only its best weights"):
        load_run_model(imported.path, "last")


def test_an_imported_run_is_not_resumed_from_scratch(trained, bundle, tmp_path):
    """A bundle has no optimizer state: resuming would silently retrain and overwrite its best weights."""
    other = tmp_path / "other-machine"
    run = import_bundle(bundle, other, display_name="tiny.zip")
    best = _sha(run.checkpoint("best"))
    ran = engine("train", "--resume", run.run_id, "--epochs", "2", "--out", str(other))
    ran.assert_one_line_error("no training state to resume from (a run bundle carries its best weights")
    assert _sha(run.checkpoint("best")) == best and run.config()["epochs"] == 1 and run.status().state == "finished"


def test_reimporting_the_same_bundle_returns_the_same_run(trained, bundle, tmp_path):
    first = import_bundle(bundle, tmp_path / "runs")
    stamp = first.status_path.stat().st_mtime_ns
    again = import_bundle(bundle, tmp_path / "runs")
    assert again.path == first.path and first.status_path.stat().st_mtime_ns == stamp
    assert [r.run_id for r in list_runs(tmp_path / "runs")] == [trained.run_id]
    # on the machine that trained it, the bundle is that very run
    home = _copy_run(trained, tmp_path / "home")
    assert import_bundle(bundle, tmp_path / "home").path == home.path
    assert len(list_runs(tmp_path / "home")) == 1


def test_an_id_taken_by_another_run_imports_under_a_new_id(trained, bundle, tmp_path):
    root = tmp_path / "runs"
    mine = _copy_run(trained, root)
    mine.rewrite_metrics([{**mine.metrics()[0], "val_acc": 0.123}])  # another run of the same name
    kept = {p.name: _sha(p) for p in mine.path.iterdir() if p.is_file()}
    imported = import_bundle(bundle, root)
    assert imported.run_id.startswith(f"{trained.run_id}-imported-")
    assert {p.name: _sha(p) for p in mine.path.iterdir() if p.is_file()} == kept  # never overwritten
    assert imported.problems() == [] and evaluate_run(imported).val_acc == evaluate_run(trained).val_acc
    assert import_bundle(bundle, root).path == imported.path  # idempotent under its new id too
    assert len(list_runs(root)) == 2


def test_two_imports_at_once_give_one_run(bundle, tmp_path):
    root, results, errors = tmp_path / "runs", [], []

    def go():
        try:
            results.append(import_bundle(bundle, root).path)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in root.iterdir()] == [results[0].name]


def test_a_dead_importers_leftover_is_swept(bundle, tmp_path):
    root = tmp_path / "runs"
    dead = root / ".bundle-import-deadbeef.part"
    (dead / "run").mkdir(parents=True)
    (dead / "run" / "config.json").write_text("{}")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    run = import_bundle(bundle, root)
    assert [p.name for p in root.iterdir()] == [run.run_id]


def test_a_run_without_the_json_copy_of_its_meta_still_round_trips(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "runs")
    run.checkpoint("best").with_suffix(".json").unlink()  # the meta inside the weights is the truth
    assert run.problems() == []
    imported = import_bundle(export_bundle(run, script_for=script_for_run), tmp_path / "other")
    assert imported.problems() == []
    assert json.loads(imported.checkpoint("best").with_suffix(".json").read_text()) == trained.checkpoint_meta("best")


# ------------------------------------------------------------------ what cannot be exported
def _running(run):
    run.write_status(state="running", pid=os.getpid(), pid_start=process_start(os.getpid()), heartbeat=time.time())


def _queued(run):
    run.write_status(state="queued", pid=None)


def _damaged(run):
    run.checkpoint("best").write_bytes(run.checkpoint("best").read_bytes()[:1000])


def _no_best(run):
    for name in ("best.safetensors", "best.json", "last_state.pt"):
        (run.path / name).unlink()
    run.write_status(state="cancelled")


def test_an_export_never_writes_into_the_runs_folder_or_through_a_link_device_or_pipe(trained, tmp_path):
    """-o RUN/best.safetensors destroyed the run it exported; -o onto a device node or a pipe replaced the
    node with a zip (a rename replaces what is there). Refused before anything is written; the script
    and ONNX exports share the check."""
    from engine.runs.bundle import export_bundle_file

    run = _copy_run(trained, tmp_path / "runs")
    before = {p.name: _sha(p) for p in run.path.iterdir() if p.is_file()}
    pipe, link = tmp_path / "pipe", tmp_path / "link.zip"
    os.mkfifo(pipe)
    link.symlink_to(tmp_path / "elsewhere.zip")
    for target, phrase in ((run.path / "best.safetensors", "inside the runs folder"),
                           (tmp_path / "runs" / "x.zip", "inside the runs folder"),
                           (pipe, "not a plain file"), (link, "not a plain file")):
        with pytest.raises(EngineError, match=phrase):
            export_bundle_file(run, target, script_for=script_for_run)
    assert {p.name: _sha(p) for p in run.path.iterdir() if p.is_file()} == before
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and link.is_symlink() and not (tmp_path / "elsewhere.zip").exists()
    for fmt in ("script", "onnx"):
        engine("export", run.run_id, "--format", fmt, "-o", str(run.path / "config.json"),
               "--out", str(tmp_path / "runs")).assert_one_line_error("inside the runs folder")
    assert {p.name: _sha(p) for p in run.path.iterdir() if p.is_file()} == before
    written = export_bundle_file(run, tmp_path / "fine.zip", script_for=script_for_run)
    umask = os.umask(0)
    os.umask(umask)
    assert written["files"] and stat.S_IMODE(os.stat(tmp_path / "fine.zip").st_mode) == 0o644 & ~umask  # as any file


@pytest.mark.parametrize("spoil, phrase", [(_running, "still running"), (_queued, "still queued"),
                                           (_damaged, "damaged"), (_no_best, "no best checkpoint")],
                         ids=["running", "queued", "damaged", "no-best"])
def test_an_active_damaged_or_unfinished_run_is_not_exported(trained, tmp_path, spoil, phrase):
    run = _copy_run(trained, tmp_path / "runs")
    spoil(run)
    with pytest.raises(RunError, match=phrase) as caught:
        export_bundle(run, script_for=script_for_run)
    assert "\n" not in str(caught.value) and run.run_id in str(caught.value)


# ------------------------------------------------------------------ hostile bundles
def _members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    return [(i, zf.read(i)) for i in zf.infolist()]


def _rebuild(data: bytes, changes: dict[str, bytes | None] | None = None, *, rehash: bool = True,
             extra: tuple = (), manifest=None) -> bytes:
    """The good bundle with members replaced (bytes) or dropped (None); ``rehash`` keeps bundle.json
    truthful about them, so the check that follows the hashes is the one that must refuse."""
    changes = changes or {}
    members = {i.filename: (i, d) for i, d in _members(data)}
    meta = json.loads(members.pop("bundle.json")[1])
    for name, new in changes.items():
        if new is None:
            members.pop(name)
            if rehash:
                meta["files"].pop(name)
        else:
            info = members[name][0] if name in members else zipfile.ZipInfo(name)
            members[name] = (info, new)
            if rehash:
                meta["files"][name] = {"size": len(new), "sha256": hashlib.sha256(new).hexdigest()}
    if manifest:
        manifest(meta)
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names, on purpose
        for info, payload in [*members.values(), *extra]:
            name = info if isinstance(info, str) else info.filename
            zf.writestr(info, payload, compress_type=zipfile.ZIP_STORED if name.endswith(".safetensors")
                        else zipfile.ZIP_DEFLATED)  # as an export stores them
        zf.writestr("bundle.json", json.dumps(meta))
    return buf.getvalue()


def _patch_central(data: bytes, name: str, offset: int, fmt: str, value: int) -> bytes:
    """Rewrite one field of a member's central-directory record (what zipfile believes)."""
    buf, pos = bytearray(data), 0
    while (pos := buf.find(b"PK\x01\x02", pos)) >= 0:
        length = struct.unpack_from("<H", buf, pos + 28)[0]
        if bytes(buf[pos + 46: pos + 46 + length]) == name.encode():
            struct.pack_into(fmt, buf, pos + offset, value)
            return bytes(buf)
        pos += 4
    raise AssertionError(name)


def _weights(data: bytes, *, meta_edit=None, tensor_edit=None) -> bytes:
    """best.safetensors of the good bundle, with its meta or tensors changed (rewritten as safetensors)."""
    raw = dict((i.filename, d) for i, d in _members(data))["best.safetensors"]
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["workbench_meta"])
    tensors = load_safetensors(raw)
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors, meta)
    return save_safetensors(tensors, metadata={"workbench_meta": json.dumps(meta)})


def _best_json(data: bytes, weights: bytes) -> bytes:
    header = json.loads(weights[8: 8 + int.from_bytes(weights[:8], "little")])
    return header["__metadata__"]["workbench_meta"].encode()


def _weights_case(**edits):
    def build(data: bytes) -> bytes:
        weights = _weights(data, **edits)
        return _rebuild(data, {"best.safetensors": weights, "best.json": _best_json(data, weights)})
    return build


def _config(**fields):
    def build(data: bytes) -> bytes:
        config = json.loads(dict((i.filename, d) for i, d in _members(data))["config.json"])
        return _rebuild(data, {"config.json": json.dumps({**config, **fields}).encode()})
    return build


def _link_entry(data: bytes) -> bytes:
    info = zipfile.ZipInfo("reproduce.py")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    members = [(i, d) for i, d in _members(data) if i.filename != "reproduce.py"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, d in members:
            zf.writestr(i, d)
        zf.writestr(info, b"/etc/passwd")
    return buf.getvalue()


class _Boom:
    """A pickle that would leave a file behind if anything ever unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_weights(data: bytes, marker: Path) -> bytes:
    return _rebuild(data, {"best.safetensors": pickle.dumps({"model": _Boom(marker)})})


def _torch_save_weights(data: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save(load_safetensors(dict((i.filename, d) for i, d in _members(data))["best.safetensors"]), buf)
    return _rebuild(data, {"best.safetensors": buf.getvalue()})


def _flip_weights_byte(data: bytes) -> bytes:
    """Same size, one byte of a tensor changed, bundle.json left as exported: only the hash can tell."""
    raw = bytearray(dict((i.filename, d) for i, d in _members(data))["best.safetensors"])
    raw[-3] ^= 0x01
    return _rebuild(data, {"best.safetensors": bytes(raw)}, rehash=False)


def _rename_tensors(tensors, meta):
    """Another architecture's body under the same head."""
    for k in [k for k in tensors if not k.startswith(meta["spec"]["head"] + ".")]:
        tensors["backbone." + k] = tensors.pop(k)


def _head_rows(rows):
    def edit(tensors, meta):
        head = meta["spec"]["head"]
        tensors[f"{head}.weight"] = torch.zeros(rows, tensors[f"{head}.weight"].shape[1])
        tensors[f"{head}.bias"] = torch.zeros(rows)
    return edit


def _nan(tensors, meta):
    for k, v in tensors.items():
        if v.is_floating_point():
            tensors[k] = torch.full_like(v, float("nan"))


HOSTILE = {
    "not-a-zip": (lambda d: b"this is not a zip at all\n" * 40, "not a readable zip"),
    "truncated-half": (lambda d: d[: len(d) // 2], "not a readable zip"),
    "truncated-tail": (lambda d: d[:-30], "not a readable zip"),
    "empty-zip": (lambda d: _empty_zip(), "not a run bundle"),
    "no-manifest": (lambda d: _drop_manifest(d), "no bundle.json"),
    "manifest-not-json": (lambda d: _replace_manifest(d, b"{oops"), "bundle.json' is not valid json"),
    "manifest-deep-json": (lambda d: _replace_manifest(d, b"[" * 100_000 + b"]" * 100_000), "not valid json"),
    "manifest-newer-format": (lambda d: _rebuild(d, manifest=lambda m: m.update(format=99)), "newer version"),
    "manifest-run-id-escapes": (lambda d: _rebuild(d, manifest=lambda m: m.update(run_id="../../etc")),
                                "no usable run id"),
    "manifest-lists-a-stranger": (lambda d: _rebuild(d, manifest=lambda m: m["files"].update(
        {"last_state.pt": {"size": 1, "sha256": "0" * 64}})), "not part of a run bundle"),
    "path-traversal-member": (lambda d: _rebuild(d, extra=(("../../evil.py", b"import os"),)), "points outside"),
    "absolute-path-member": (lambda d: _rebuild(d, extra=(("/etc/cron.d/evil", b"* * * * * root sh"),)),
                             "points outside"),
    "symlink-member": (_link_entry, "is a link"),
    "member-in-a-folder": (lambda d: _rebuild(d, extra=(("sub/config.json", b"{}"),)), "in a folder"),
    "unexpected-member": (lambda d: _rebuild(d, extra=(("notes.txt", b"hello"),)), "not part of a run bundle"),
    "control-characters-in-a-name": (lambda d: _rebuild(d, extra=(("notes\nerror fake.txt", b""),)),
                                     "'notes?error fake.txt' is not part"),
    "pickle-member-by-name": (lambda d: _rebuild(d, extra=(("last_state.pt", b"\x80\x04N."),)),
                              "not part of a run bundle"),
    "unlisted-member": (lambda d: _unlisted(d), "not listed in bundle.json"),
    "listed-member-missing": (lambda d: _rebuild(d, {"best.json": None}, rehash=False), "listed in bundle.json but missing"),
    "required-member-missing": (lambda d: _rebuild(d, {"config.json": None}), "incomplete"),
    "duplicate-member": (lambda d: _rebuild(d, extra=(("config.json", b"{}"),)), "appears twice"),
    "too-many-members": (lambda d: _rebuild(d, extra=tuple((f"x{i}.txt", b"") for i in range(20))), "at most 16"),
    "declared-size-huge": (lambda d: _patch_central(d, "metrics.jsonl", 24, "<I", 3 * 1024**3), "unpacks to 3.2 GB"),
    "declared-size-small": (lambda d: _patch_central(d, "metrics.jsonl", 24, "<I", 10), "does not have the size"),
    "manifest-size-huge": (lambda d: _rebuild(d, manifest=lambda m: m["files"]["best.safetensors"].update(
        size=5 * 1024**3)), "unpacks to 5.4 GB"),
    "zip-bomb-ratio": (lambda d: _rebuild(d, {"metrics.jsonl": b"\n" * (50 * 1024**2)}), "compression ratio"),
    "json-over-its-limit": (lambda d: _rebuild(d, {"config.json": b" " * (5 * 1024**2) + b"{}"}), "limit is 4.2 MB"),
    "encrypted-flag": (lambda d: _patch_central(d, "config.json", 8, "<H", 0x1), "encrypted"),
    "crc-damage": (lambda d: _damage_deflated(d, "reproduce.py"), "damaged"),
    "hash-mismatch": (_flip_weights_byte, "does not match its sha256"),
    "size-mismatch": (lambda d: _rebuild(d, {"config.json": b"{}"}, rehash=False), "does not have the size"),
    "weights-torch-save": (_torch_save_weights, "not a safetensors file"),
    "weights-garbage": (lambda d: _rebuild(d, {"best.safetensors": os.urandom(4096)}), "not a safetensors file"),
    "weights-empty": (lambda d: _rebuild(d, {"best.safetensors": b""}), "not a safetensors file"),
    "config-not-json": (lambda d: _rebuild(d, {"config.json": b"{oops"}), "config.json' is not valid json"),
    "config-a-list": (lambda d: _rebuild(d, {"config.json": b"[1, 2]"}), "not a json object"),
    "config-epochs-zero": (_config(epochs=0), "epochs must be between"),
    "config-batch-size-text": (_config(batch_size="many"), "batch_size must be a whole number"),
    "config-unknown-model": (_config(model="timm:no_such_net"), "unknown model"),
    "metrics-not-text": (lambda d: _rebuild(d, {"metrics.jsonl": b"\xff\xfe\x00bad"}), "metrics.jsonl' is not text"),
    "script-not-text": (lambda d: _rebuild(d, {"reproduce.py": b"\x80\x04\x95pickle"}), "reproduce.py' is not text"),
    "class-names-more-than-head": (_weights_case(meta_edit=lambda m: m.update(class_names=m["class_names"] + ["x"])),
                                   "head predicts 2 classes but 3 class names"),
    "class-count-and-spec-agree-but-head-differs": (
        _weights_case(meta_edit=lambda m: (m.update(class_names=m["class_names"] + ["x"]),
                                           m["spec"].update(num_classes=3))), "head predicts 2 classes but 3"),
    "head-of-another-size": (_weights_case(tensor_edit=_head_rows(5)), "head predicts 5 classes but 2"),
    "no-class-names": (_weights_case(meta_edit=lambda m: m.update(class_names=[])), "no class names"),
    "no-model-spec": (_weights_case(meta_edit=lambda m: m.pop("spec")), "no readable model description"),
    "spec-unknown-model": (_weights_case(meta_edit=lambda m: m["spec"].update(name="timm:no_such_net")),
                           "cannot be built here"),
    "another-models-tensors": (_weights_case(tensor_edit=_rename_tensors), "does not fit timm:test_resnet"),
    "nan-weights": (_weights_case(tensor_edit=_nan), "nan"),
    # preprocessing is read from the weights: a 30000 px input size is a 10.8 GB tensor at evaluation
    "input-size-huge": (_weights_case(meta_edit=lambda m: m["spec"].update(input_size=[3, 30000, 30000])),
                        "preprocessing"),
    "interpolation-unknown": (_weights_case(meta_edit=lambda m: m["spec"].update(interpolation="evil")),
                              "preprocessing"),
    "std-zero": (_weights_case(meta_edit=lambda m: m["spec"].update(std=[0, 0, 0])), "preprocessing"),
    # class names are printed by predict and eval: no escape sequences, newlines or repeats
    "class-name-escape": (_weights_case(meta_edit=lambda m: _names(m, ["\x1b[31mred", "b"])), "control characters"),
    "class-name-newline": (_weights_case(meta_edit=lambda m: _names(m, ["a\nerror: fake", "b"])), "control characters"),
    "class-names-repeat": (_weights_case(meta_edit=lambda m: _names(m, ["a", "a"])), "class names repeat"),
    "config-names-another-model": (_config(model="timm:resnet18"), "names timm:resnet18 but the weights are"),
    "metrics-beyond-the-config": (lambda d: _rebuild(d, {"metrics.jsonl": _metrics(d) * 40}), "more than the"),
    "overrides-not-decisions": (lambda d: _rebuild(d, {"data-overrides.json": b'{"decisions": "x"}'}),
                                "not a list of decisions"),
}


def _metrics(data: bytes) -> bytes:
    return dict((i.filename, d) for i, d in _members(data))["metrics.jsonl"]


def _names(meta: dict, names: list[str]) -> None:
    meta["class_names"] = names
    meta["spec"]["class_names"] = names


def _empty_zip() -> bytes:
    buf = io.BytesIO()
    zipfile.ZipFile(buf, "w").close()
    return buf.getvalue()


def _drop_manifest(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, d in _members(data):
            if i.filename != "bundle.json":
                zf.writestr(i, d)
    return buf.getvalue()


def _replace_manifest(data: bytes, text: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, d in _members(data):
            zf.writestr(i, text if i.filename == "bundle.json" else d)
    return buf.getvalue()


def _unlisted(data: bytes) -> bytes:
    """events.jsonl is a bundle file, but this bundle.json does not list it."""
    return _rebuild(data, {"events.jsonl": None}, extra=(("events.jsonl", b"{}\n"),))


def _damage_deflated(data: bytes, name: str) -> bytes:
    """Flip a byte inside a deflated member's data (its local header and sizes unchanged)."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.getinfo(name)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    buf = bytearray(data)
    buf[start + info.compress_size // 2] ^= 0xFF
    return bytes(buf)


def _assert_refused(exc: BaseException, phrase: str, tmp_path: Path) -> None:
    message = str(exc)
    assert isinstance(exc, BundleError) and isinstance(exc, EngineError)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{EVIL}: "), message
    assert phrase.lower() in message.lower(), (phrase, message)
    assert str(tmp_path) not in message and "bundle-import" not in message  # no server or temp path


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_bundle_is_refused_in_one_line_leaving_nothing(bundle, tmp_path, case):
    build, phrase = HOSTILE[case]
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(EngineError) as caught:
        import_bundle(build(bundle), root, display_name=EVIL)
    _assert_refused(caught.value, phrase, tmp_path)
    assert list(root.iterdir()) == []


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(bundle, tmp_path):
    marker = tmp_path / "unpickled"
    root = tmp_path / "runs"
    with pytest.raises(BundleError) as caught:
        import_bundle(_pickle_weights(bundle, marker), root, display_name=EVIL)
    _assert_refused(caught.value, "not a safetensors file", tmp_path)
    assert not marker.exists() and list(root.iterdir()) == []
    pickle.loads(pickle.dumps({"model": _Boom(marker)}))["model"].close()  # the payload is live: unpickled, it writes
    assert marker.exists()


def test_a_bundle_file_on_disk_is_named_as_the_user_knows_it(bundle, tmp_path):
    path = tmp_path / "uploads" / "my run.zip"
    path.parent.mkdir()
    path.write_bytes(bundle[:100])
    with pytest.raises(BundleError, match=r"^my run\.zip: not a readable zip") as caught:
        import_bundle(path, tmp_path / "runs")
    assert str(tmp_path) not in str(caught.value)
    with pytest.raises(BundleError, match="no such file"):
        import_bundle(tmp_path / "missing.zip", tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_tighter_limits_refuse_what_default_ones_take(bundle, tmp_path):
    with pytest.raises(BundleError, match="best.safetensors' unpacks to .* the limit is 1.0 MB"):
        import_bundle(bundle, tmp_path / "runs", display_name=EVIL, limits=BundleLimits(max_weights_bytes=10**6))
    assert list((tmp_path / "runs").iterdir()) == []


def test_imported_from_survives_json_and_garbage():
    status = RunStatus(state="finished", imported_from={"bundle": "a.zip", "run_id": "x", "imported_at": 1.5})
    assert RunStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status
    assert RunStatus.from_dict({"imported_from": "a.zip"}).imported_from is None
    odd = RunStatus.from_dict({"imported_from": {"bundle": "a.zip", "nested": {"x": 1}, "flag": True}})
    assert odd.imported_from == {"bundle": "a.zip"}


# ------------------------------------------------------------------ the command line
def test_cli_exports_and_imports_a_run(trained, tmp_path, cat_photo):
    source = tmp_path / "source"
    run = _copy_run(trained, source)
    exported = engine("runs", "export", run.run_id, "-o", str(tmp_path / "run.zip"), "--out", str(source), "--json")
    assert exported.rc == 0, exported.err
    assert json.loads(exported.out)["path"] == str(tmp_path / "run.zip")
    default = engine("runs", "export", run.run_id, "--out", str(source), cwd=tmp_path)
    assert default.rc == 0 and (tmp_path / f"{run.run_id}.zip").is_file(), default.err

    other = tmp_path / "other"
    imported = engine("runs", "import", str(tmp_path / "run.zip"), "--out", str(other), "--json")
    assert imported.rc == 0, imported.err
    data = json.loads(imported.out)
    assert data["run_id"] == run.run_id and data["state"] == "finished" and data["imported_from"]["bundle"] == "run.zip"
    listed = engine("runs", "--out", str(other), "--json")
    assert [(r["run_id"], r["state"]) for r in json.loads(listed.out)] == [(run.run_id, "finished")]
    evaluated = engine("eval", run.run_id, "--out", str(other), "--json")
    assert evaluated.rc == 0, evaluated.err
    assert json.loads(evaluated.out)["val_acc"] == evaluate_run(trained).val_acc
    predicted = engine("predict", str(cat_photo), "--run", run.run_id, "--out", str(other), "--json", "--top-k", "2")
    assert predicted.rc == 0, predicted.err
    assert [(t["label"], t["prob"]) for t in json.loads(predicted.out)[0]["topk"]] == \
        [(label, pytest.approx(p, abs=1e-6)) for label, p in _probs(trained, cat_photo)]


def test_cli_refuses_in_one_line(trained, tmp_path):
    source = tmp_path / "source"
    run = _copy_run(trained, source)
    _running(run)
    engine("runs", "export", run.run_id, "-o", str(tmp_path / "x.zip"), "--out", str(source)) \
        .assert_one_line_error("still running")
    assert not (tmp_path / "x.zip").exists() and not list(tmp_path.glob(".x.zip.*"))
    (tmp_path / "notes.zip").write_text("not a zip")
    engine("runs", "import", str(tmp_path / "notes.zip"), "--out", str(tmp_path / "runs")) \
        .assert_one_line_error("notes.zip: not a readable zip")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    engine("runs", "export", "--out", str(source)).assert_one_line_error("runs export RUN")
    engine("runs", "import", "--out", str(source)).assert_one_line_error("runs import FILE.zip")


# ------------------------------------------------------------------ the Runs page
def _runs_page(monkeypatch, root: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_RUNS", str(root))
    monkeypatch.setenv("WORKBENCH_DATA", str(root.parent / "data"))
    return AppTest.from_file(str(ROOT / "views" / "runs.py"), default_timeout=180)


def test_runs_page_offers_the_bundle_download(trained, tmp_path, monkeypatch):
    _copy_run(trained, tmp_path / "runs")
    at = _runs_page(monkeypatch, tmp_path / "runs")
    at.run()
    assert not at.exception, at.exception
    labels = [b.label for b in at.get("download_button")]
    assert "Run bundle (.zip)" in labels, labels
    assert at.file_uploader[0].label == "Import a run bundle"


def test_runs_page_imports_an_uploaded_bundle_and_selects_it(trained, bundle, tmp_path, monkeypatch):
    at = _runs_page(monkeypatch, tmp_path / "runs")
    at.run()
    assert not at.exception
    assert any("No runs yet" in i.value for i in at.info)
    at.file_uploader[0].set_value(("tiny-bundle.zip", bundle, "application/zip")).run()
    assert not at.exception, at.exception
    assert any(f"imported as run {trained.run_id}" in s.value for s in at.success), [s.value for s in at.success]
    assert next(s for s in at.selectbox if s.label == "Run").value == trained.run_id
    assert [r.run_id for r in usable_runs(tmp_path / "runs")] == [trained.run_id]
    at.run()  # a rerun shows the outcome again without importing twice
    assert not at.exception and len(list_runs(tmp_path / "runs")) == 1


def test_runs_page_refuses_a_bad_bundle_in_a_box(tmp_path, monkeypatch):
    at = _runs_page(monkeypatch, tmp_path / "runs")
    at.run()
    at.file_uploader[0].set_value(("holiday.zip", b"PK\x03\x04 not really", "application/zip")).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("holiday.zip: not a readable zip") for e in errors), errors
    assert not any(str(tmp_path) in e for e in errors)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
