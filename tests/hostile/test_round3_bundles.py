"""Round 3, what a bundle or a run folder can make the server do: size before allocating (a 14 KB bundle
naming a 6.7-billion-parameter model), the hosted caps at import and export, metrics rows of another
shape (refused at import, read tolerantly from a run already on disk, which stays deletable), outputs
that are not finite on a probe image (runs, bundles, ``--weights`` files), and a hosted comparison
refused for its epochs that must leave no run behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.core.errors import EngineError, RunError
from engine.core.memory import GB, MemoryBudget
from engine.outputs.code import script_for_run
from engine.runs.bundle import BundleError, export_bundle, import_bundle
from engine.runs.load import load_run_model
from engine.runs.store import delete_run, describe_run, list_runs, open_run
from tests.conftest import ROOT, tiny_lfw_run
from tests.hostile._cli import Ran, engine
from tests.test_bundle import _best_json, _members, _rebuild, _replace_manifest, _weights

EVIL = "evil.zip"
HUGE = "timm:vit_7b_patch16_dinov3"  # 6.7 billion parameters: 27 GB of float32


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    return tiny_lfw_run(tmp_path_factory.mktemp("round3-bundle-runs"), run_id="20240101-000000-r3")


@pytest.fixture(scope="module")
def bundle(good_run) -> bytes:
    return export_bundle(good_run, script_for=script_for_run)


def _refused(exc: BaseException, phrase: str) -> None:
    message = str(exc)
    assert isinstance(exc, BundleError), type(exc)
    assert message.startswith(f"{EVIL}: ") and "\n" not in message, message
    assert phrase.lower() in message.lower(), (phrase, message)


def _nothing_imported(root: Path) -> None:
    """A refused import writes nothing: no run and no temp folder (the runs folder itself may exist)."""
    assert not root.exists() or sorted(p.name for p in root.iterdir()) == [], sorted(p.name for p in root.iterdir())


class PeakRss:
    """The highest resident memory of a process while the block runs (sampled every few ms)."""

    def __init__(self, pid: int | None = None):
        self.process = psutil.Process(pid or os.getpid())
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def grew(self) -> int:
        return self.peak - self.start


def _model_case(name: str, head: str, features: int, **spec):
    """The good bundle's weights renamed to ``name``: its meta, its config, and only a head tensor."""
    def tensors(t, meta):
        rows = len(meta["class_names"])
        t.clear()
        t[f"{head}.weight"] = torch.zeros(rows, features)
        t[f"{head}.bias"] = torch.zeros(rows)

    def build(data: bytes) -> bytes:
        arch = name.split(":", 1)[1]
        weights = _weights(data, meta_edit=lambda m: m["spec"].update(name=name, arch=arch, head=head, **spec),
                           tensor_edit=tensors)
        config = json.loads(dict((i.filename, d) for i, d in _members(data))["config.json"])
        return _rebuild(data, {"best.safetensors": weights, "best.json": _best_json(data, weights),
                               "config.json": json.dumps({**config, "model": name}).encode()})
    return build


# ------------------------------------------------------------------ 1. size before allocating
def test_a_bundle_naming_a_huge_model_is_refused_before_building(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr("engine.models.sizing.detect_budget", lambda: MemoryBudget(4 * GB, "a 4 GB test box"))
    evil = _model_case(HUGE, "head", 4096)(bundle)
    assert len(evil) < 200_000
    with PeakRss() as rss, pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, "more than the memory budget of 4.00 GB")
    assert "refused before anything is built" in str(caught.value)
    assert rss.grew < 300 * 10**6, rss.grew
    _nothing_imported(tmp_path / "runs")


def test_a_head_only_bundle_of_a_mid_size_model_is_compared_on_meta_tensors(bundle, tmp_path):
    """vit_base (86 M parameters, 344 MB) fits the budget: its shapes are compared without building it."""
    evil = _model_case("timm:vit_base_patch16_224", "head", 768)(bundle)
    with PeakRss() as rss, pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, "does not fit timm:vit_base_patch16_224")
    assert rss.grew < 200 * 10**6, rss.grew  # a real build holds 344 MB of parameters
    _nothing_imported(tmp_path / "runs")


def _engine_peak(*args: str, env: dict[str, str] | None = None) -> tuple[Ran, int]:
    """The CLI in a fresh process, with the peak resident memory it reached."""
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    with PeakRss(proc.pid) as rss:
        out, err = proc.communicate(timeout=300)
    return Ran(proc.returncode, out, err), rss.peak


def test_cli_runs_import_of_a_huge_model_is_one_line_in_bounded_memory(bundle, tmp_path):
    path = tmp_path / EVIL
    path.write_bytes(_model_case(HUGE, "head", 4096)(bundle))
    ran, peak = _engine_peak("runs", "import", str(path), "--out", str(tmp_path / "runs"))
    ran.assert_one_line_error("refused")
    assert "vit_7b" in ran.err and peak < 1_500 * 10**6, (ran.err, peak)  # 27 GB if it were built
    _nothing_imported(tmp_path / "runs")


def test_hosted_bundle_with_4096_px_preprocessing_is_refused_at_import(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    evil = _rebuild(bundle, {})
    weights = _weights(evil, meta_edit=lambda m: m["spec"].update(input_size=[3, 4096, 4096]))
    evil = _rebuild(bundle, {"best.safetensors": weights, "best.json": _best_json(bundle, weights)})
    with pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, "4096 px")
    assert "at most 224 px" in str(caught.value)
    _nothing_imported(tmp_path / "runs")


def test_hosted_bundle_over_the_model_size_cap_is_refused_before_building(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    evil = _model_case("timm:vit_base_patch16_224", "head", 768)(bundle)
    with PeakRss() as rss, pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, "at most 30 M")
    assert rss.grew < 200 * 10**6
    _nothing_imported(tmp_path / "runs")


def _copy(run, tmp_path: Path, run_id: str | None = None):
    target = tmp_path / "runs" / (run_id or run.run_id)
    shutil.copytree(run.path, target)
    return open_run(tmp_path / "runs", target.name)


def _edit_best(run, *, meta_edit=None, tensor_edit=None) -> None:
    """Rewrite a run's best checkpoint (weights and meta kept in one safetensors file, as the engine does)."""
    from safetensors import safe_open

    path = run.checkpoint("best")
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["workbench_meta"])
    tensors = load_file(str(path))
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(path), metadata={"workbench_meta": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["export_run", "onnx_package"])
def test_hosted_onnx_export_respects_the_image_size_cap(good_run, tmp_path, monkeypatch, how):
    run = _copy(good_run, tmp_path)
    _edit_best(run, meta_edit=lambda m: m["spec"].update(input_size=[3, 512, 512]))
    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EngineError, match=r"512 px images; .* at most 224 px"):
        if how == "export_run":
            from engine.outputs.run_export import export_run

            export_run(run, "onnx", str(out / "model.onnx"))
        else:
            from engine.outputs.onnx_export import onnx_package

            onnx_package(load_run_model(run.path))
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 2. metrics rows: refused at import
def _metrics_case(rows: list):
    return lambda d: _rebuild(d, {"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})


METRICS_CASES = {
    "epoch-only": ([{"epoch": 1}], "metrics.jsonl line 1 lacks train_loss, val_loss, val_acc"),
    "val-acc-text": ([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": "high", "train_acc": 0.5,
                       "epoch_s": 1.0, "images_per_s": 3.0, "trainable_params": 5, "elapsed_s": 1.0}],
                     "val_acc that is not a number"),
    "lr-a-list": ([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "train_acc": 0.5,
                    "epoch_s": 1.0, "images_per_s": 3.0, "trainable_params": 5, "elapsed_s": 1.0, "lr": [1, 2]}],
                  "an lr that is not a map"),
    "epoch-zero": ([{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "train_acc": 0.5,
                     "epoch_s": 1.0, "images_per_s": 3.0, "trainable_params": 5, "elapsed_s": 1.0}],
                   "epoch that is not a whole number"),
    "a-list-not-a-row": ([[1, 2, 3]], "line 1 is not a json object"),
    "deep-line": (None, "metrics.jsonl line 1 is refused: it nests deeper than"),
}


@pytest.mark.parametrize("case", list(METRICS_CASES), ids=list(METRICS_CASES))
def test_a_bundle_whose_metrics_rows_are_of_another_shape_is_refused(bundle, tmp_path, case):
    rows, phrase = METRICS_CASES[case]
    evil = (_metrics_case(rows)(bundle) if rows is not None
            else _rebuild(bundle, {"metrics.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n"}))
    with pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, phrase)
    _nothing_imported(tmp_path / "runs")


# ------------------------------------------------------------------ 5. bounded parsing inside a bundle
NINES = "9" * 400


def _raw_config(placeholder_value: str, **fields):
    """config.json with ``fields`` set, then the text "__X__" (quotes included) replaced by raw JSON."""
    def build(data: bytes) -> bytes:
        config = json.loads(dict((i.filename, d) for i, d in _members(data))["config.json"])
        for key, value in fields.items():
            if key == "unfreeze_schedule":
                config["plan"]["unfreeze_schedule"] = value
            else:
                config[key] = value
        text = json.dumps(config).replace('"__X__"', placeholder_value)
        return _rebuild(data, {"config.json": text.encode()})
    return build


def _deep_weights_meta(data: bytes) -> bytes:
    raw = dict((i.filename, d) for i, d in _members(data))["best.safetensors"]
    tensors = {k: v for k, v in load_safetensors_bytes(raw).items()}
    from safetensors.torch import save

    weights = save(tensors, metadata={"workbench_meta": "[" * 100_000 + "]" * 100_000})
    return _rebuild(data, {"best.safetensors": weights})


def load_safetensors_bytes(raw: bytes) -> dict:
    from safetensors.torch import load

    return load(raw)


def _manifest_raw(data: bytes, key: str, raw: str) -> bytes:
    manifest = json.loads(dict((i.filename, d) for i, d in _members(data))["bundle.json"])
    manifest[key] = "__X__"
    return _replace_manifest(data, json.dumps(manifest).replace('"__X__"', raw).encode())


BOUNDED = {
    "config-memory-budget-1e999": (_raw_config("1e999", memory_budget="__X__"), "config.json' is not valid json"),
    "config-memory-budget-400-nines-text": (_raw_config(f'"{NINES}"', memory_budget="__X__"),
                                            "beyond any machine"),
    "config-unfreeze-1e999": (_raw_config("1e999", unfreeze_schedule=[["__X__", 1]]), "out of range"),
    "config-unfreeze-400-nines": (_raw_config(NINES, unfreeze_schedule=[["__X__", 1]]), "out of range"),
    "weights-meta-100000-deep": (_deep_weights_meta, "not a safetensors file"),
    "manifest-exported-at-1e999": (lambda d: _manifest_raw(d, "exported_at", "1e999"), "bundle.json' is not valid json"),
}


@pytest.mark.parametrize("case", list(BOUNDED), ids=list(BOUNDED))
def test_hostile_json_or_numbers_in_a_bundle_are_one_line(bundle, tmp_path, case):
    build, phrase = BOUNDED[case]
    with pytest.raises(EngineError) as caught:
        import_bundle(build(bundle), tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, phrase)
    _nothing_imported(tmp_path / "runs")


# ------------------------------------------------------------------ 2. a damaged run already on disk
DAMAGED_METRICS = {
    "epoch-only": '{"epoch": 1}\n{"epoch": 2}\n',
    "text-numbers": '{"epoch": 1, "train_loss": "x", "val_loss": 1, "val_acc": 0.5}\n',
    "lr-a-list-and-no-timings": '{"epoch": 1, "train_loss": 1, "val_loss": 1, "val_acc": 0.5, "lr": [1]}\n',
    "bool-epoch": '{"epoch": true, "train_loss": 1, "val_loss": 1, "val_acc": 0.5}\n',
}


@pytest.mark.parametrize("case", list(DAMAGED_METRICS), ids=list(DAMAGED_METRICS))
def test_every_reader_survives_a_run_with_damaged_metrics_and_it_can_be_deleted(good_run, tmp_path, case):
    from engine.lab.compare import comparison_table, curves
    from engine.runs.tensorboard import epoch_scalars, lr_scalars

    run = _copy(good_run, tmp_path)
    run.metrics_path.write_text(DAMAGED_METRICS[case])
    rows = run.metrics()
    for row in rows:  # what pages index without .get(): all there, all numbers
        assert all(isinstance(row[k], (int, float)) for k in ("epoch", "train_loss", "val_loss", "val_acc",
                                                              "epoch_s", "elapsed_s", "images_per_s"))
        assert isinstance(row["lr"], dict)
    summary = describe_run(run)
    assert summary.run_id == run.run_id and summary.epochs == f"{len(rows)}/1"
    assert comparison_table([run])[0]["epochs"] == len(rows)
    assert len(curves([run])) == len(rows)
    for row in rows:  # TensorBoard replays the same rows
        assert set(epoch_scalars(row)) and isinstance(lr_scalars(row["lr"]), dict)
    delete_run(run)
    assert not run.path.exists() and list_runs(tmp_path / "runs") == []


def test_a_run_whose_files_hold_values_of_the_wrong_type_is_still_listed(good_run, tmp_path):
    run = _copy(good_run, tmp_path)
    config = json.loads(run.config_path.read_text())
    run.config_path.write_text(json.dumps({**config, "model": {"a": 1}, "data": ["x"], "epochs": "many",
                                           "plan": [1], "label": {"b": 2}, "group": "cmp-x"}))
    _edit_best(run, meta_edit=lambda m: m.update(val_acc="excellent"))
    summary = describe_run(run)
    assert summary.state == "damaged" and "config.json" in summary.reason
    assert summary.model is None and summary.data is None and summary.best_val_acc is None
    from engine.lab.compare import comparison_table, curves, group_runs

    assert [r.run_id for r in group_runs(tmp_path / "runs", "cmp-x")] == [run.run_id]
    assert comparison_table([run])[0]["strategy"] is None
    assert {row["strategy"] for row in curves([run])} == {run.run_id}
    ran = engine("runs", "--out", str(tmp_path / "runs"))
    assert ran.rc == 0 and "Traceback" not in ran.err and "damaged" in ran.out, ran.err
    delete_run(run)
    assert not run.path.exists()


def test_a_linked_run_folder_is_deleted_as_a_link_not_through_it(good_run, tmp_path):
    elsewhere = _copy(good_run, tmp_path / "elsewhere")
    (tmp_path / "runs").mkdir()
    link = tmp_path / "runs" / "linked-run"
    link.symlink_to(elsewhere.path)
    [listed] = list_runs(tmp_path / "runs")
    delete_run(listed)
    assert not link.exists() and not link.is_symlink() and elsewhere.config_path.is_file()


# ------------------------------------------------------------------ 4. outputs that are not finite
def _bn_variance_below_zero(tensors) -> None:
    for k in list(tensors):
        if k.endswith("running_var"):
            tensors[k] = torch.full_like(tensors[k], -1.0)


def test_a_bundle_with_batchnorm_variance_below_zero_is_refused(bundle, tmp_path):
    weights = _weights(bundle, tensor_edit=lambda t, _m: _bn_variance_below_zero(t))
    evil = _rebuild(bundle, {"best.safetensors": weights, "best.json": _best_json(bundle, weights)})
    with pytest.raises(EngineError) as caught:
        import_bundle(evil, tmp_path / "runs", display_name=EVIL)
    _refused(caught.value, "outputs on a probe image are not finite")
    assert "BatchNorm running variance below zero" in str(caught.value)
    _nothing_imported(tmp_path / "runs")


def test_predict_with_a_run_whose_batchnorm_variance_is_below_zero_is_one_line(good_run, tmp_path, cat_photo):
    run = _copy(good_run, tmp_path)
    _edit_best(run, tensor_edit=_bn_variance_below_zero)
    with pytest.raises(RunError, match="not finite"):
        load_run_model(run.path)
    ran = engine("predict", str(cat_photo), "--run", run.run_id, "--out", str(tmp_path / "runs"))
    ran.assert_one_line_error("outputs on a probe image are not finite")
    assert ran.out == ""


@pytest.mark.parametrize("fill", ["nan", "inf", "bn-negative"])
def test_predict_with_a_weights_file_whose_outputs_are_not_finite_is_one_line(good_run, tmp_path, cat_photo, fill):
    tensors = load_file(str(good_run.checkpoint("best")))
    if fill == "bn-negative":
        _bn_variance_below_zero(tensors)
    else:
        tensors = {k: torch.full_like(v, float(fill)) if v.is_floating_point() else v for k, v in tensors.items()}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    ran = engine("predict", str(cat_photo), "--model", "timm:test_resnet", "--weights", str(path), "--json")
    ran.assert_one_line_error("weights.safetensors: the model's outputs on a probe image are not finite")
    assert ran.out == "" and "null" not in ran.out


# ------------------------------------------------------------------ 7. a refused request writes nothing
def test_a_hosted_comparison_refused_for_its_epochs_leaves_no_run(tmp_path, monkeypatch):
    from engine.config import ConfigError, TrainConfig
    from engine.lab.compare import create_comparison, demo_plans

    monkeypatch.setenv("WORKBENCH_HOSTED", "1")
    base = TrainConfig(model="timm:test_resnet", weights="none", data="digits", image_size=32, max_per_class=12,
                       epochs=50)
    with pytest.raises(ConfigError, match="at most 30 epochs"):
        create_comparison(tmp_path / "runs", base, demo_plans())
    assert list_runs(tmp_path / "runs") == []


def test_cli_hosted_compare_over_the_caps_leaves_no_run(tmp_path):
    ran = engine("compare", "--model", "timm:test_resnet", "--weights", "none", "--data", "digits", "--epochs", "50",
                 "--image-size", "32", "--max-per-class", "12", "--out", str(tmp_path / "runs"),
                 env={"WORKBENCH_HOSTED": "1"})
    ran.assert_one_line_error("at most 30 epochs")
    assert list_runs(tmp_path / "runs") == []
