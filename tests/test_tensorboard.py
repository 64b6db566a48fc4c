"""TensorBoard event files of real tiny runs, read back with TensorBoard's own reader.

Every scalar equals the run's metrics.jsonl epoch by epoch, every stage's learning rate is there,
the config is in the HParams data with the best metrics beside it; a resumed run has exactly one
value per epoch per tag (whatever a kill left in the folder); a folder that cannot be written, or
no tensorboard package, never fails the training.
"""
from __future__ import annotations

import logging
import shutil
import sys

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan
from engine.runs.store import create_run, extend_run
from engine.runs.tensorboard import HPARAM_METRICS, TB_DIR, epoch_scalars
from engine.training.loop import fit

TINY = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
            max_per_class=12, num_workers=0)


def _config(epochs: int) -> TrainConfig:
    # discriminative LRs: the head's rate differs from the backbone's, so per-stage tags are really per stage
    return TrainConfig(**TINY, epochs=epochs, plan=FreezePlan.full(head_lr=1e-3, backbone_lr_ratio=0.1).to_dict())


def _read(run) -> EventAccumulator:
    acc = EventAccumulator(str(run.path / TB_DIR))
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _hparams(acc: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    content = acc.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}


def _assert_matches_metrics(run, acc: EventAccumulator) -> None:
    """Each epoch tag holds exactly the epochs of metrics.jsonl, once each, with its values."""
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    scalars = _scalars(acc)
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in epoch_scalars(row).items():
            expected.setdefault(tag, []).append((row["epoch"], value))
    for tag, points in expected.items():
        got = scalars.get(tag)
        assert got is not None, f"{tag} missing; tags: {sorted(scalars)}"
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    for name in ("loss/train", "loss/val", "accuracy/train", "accuracy/val"):
        assert name in expected
    assert set(scalars) - set(expected) <= {"best/val_accuracy", "best/epoch"}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    config = _config(2)
    run = create_run(tmp_path_factory.mktemp("runs"), config.to_dict(), run_id="20240101-000000-tb")
    result = fit(config, run)
    assert result.status == "finished"
    return run, result


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    config = _config(1)
    run = create_run(tmp_path_factory.mktemp("runs"), config.to_dict(), run_id="20240101-000000-tb-resumed")
    assert fit(config, run).status == "finished"
    first = _scalars(_read(run))
    result = fit(TrainConfig.from_dict(extend_run(run, 2)), run, resume=True)
    assert result.status == "finished" and result.epochs_done == 2
    return run, result, first


def test_scalars_equal_metrics_per_epoch(two_epochs):
    run, result = two_epochs
    acc = _read(run)
    _assert_matches_metrics(run, acc)
    assert len(run.metrics()) == 2
    scalars = _scalars(acc)
    assert all(v > 0 for _, v in scalars["speed/images_per_s"])
    assert scalars["best/val_accuracy"] == [(2, pytest.approx(result.best_val_acc))]
    assert scalars["best/epoch"] == [(2, result.best_epoch)]
    assert [p.name for p in (run.path / TB_DIR).iterdir()] == [p.name for p in (run.path / TB_DIR).iterdir()
                                                               if p.name.startswith("events.out.tfevents.")]


def test_learning_rate_of_every_group_by_stage(two_epochs):
    run, _ = two_epochs
    scalars = _scalars(_read(run))
    for row in run.metrics():
        groups = row["lr"]
        assert groups and all("/" in name for name in groups)
        for name, lr in groups.items():
            stage = name.rpartition("/")[0]
            tag = f"lr/{stage}" if f"lr/{stage}" in scalars else f"lr/{name}"
            assert dict(scalars[tag])[row["epoch"]] == pytest.approx(lr), (name, tag)
    head, stem = dict(scalars["lr/head"]), dict(scalars["lr/stem"])
    assert head[1] == pytest.approx(10 * stem[1])  # backbone_lr_ratio 0.1: the stages really differ


def test_hparams_hold_the_config_and_the_metrics(two_epochs):
    run, _ = two_epochs
    data = _hparams(_read(run))
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(data)
    hp = data["_hparams_/session_start_info"].session_start_info.hparams
    assert hp["model"].string_value == "timm:test_resnet"
    assert hp["data"].string_value == "digits"
    assert hp["plan.strategy"].string_value == "full"
    assert hp["plan.head_lr"].number_value == pytest.approx(1e-3)
    assert hp["batch_size"].number_value == 16
    assert hp["image_size"].number_value == 32
    assert hp["epochs"].number_value == 2
    assert hp["optimizer"].string_value == "adamw"
    metrics = [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos]
    assert metrics == list(HPARAM_METRICS)
    assert data["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_resumed_run_continues_the_same_curves_once(resumed):
    run, result, first = resumed
    assert [s for s, _ in first["loss/val"]] == [1]
    acc = _read(run)
    _assert_matches_metrics(run, acc)
    scalars = _scalars(acc)
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "macro_f1/val", "balanced_accuracy/val", "lr/head", "speed/images_per_s"):
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
    assert scalars["loss/val"][0][1] == pytest.approx(first["loss/val"][0][1])  # epoch 1 unchanged
    assert scalars["best/epoch"] == [(2, result.best_epoch)]  # the first run's end (step 1) is gone
    assert len([p for p in (run.path / TB_DIR).iterdir()]) == 1  # earlier starts' files replaced
    assert _hparams(acc)["_hparams_/session_start_info"].session_start_info.hparams["epochs"].number_value == 2


def test_a_kill_before_the_old_files_went_leaves_the_later_values(resumed, tmp_path):
    """Kill -9 after a resume's replay but before it removed the earlier file: the earlier file
    (here with values for epochs past the commit and a different epoch 1) sorts first, and the
    SessionLog START at the head of the new file makes TensorBoard's readers drop it: the
    EventAccumulator and the one `tensorboard --load_fast=false` serves from (the default Rust data
    server drops a tag's later steps whenever a step repeats)."""
    run, _, _ = resumed
    tb = tmp_path / "tb"
    shutil.copytree(run.path / TB_DIR, tb)
    stale = tmp_path / "stale"
    writer = SummaryWriter(str(stale), purge_step=0)  # as every start of ours opens its file
    for epoch in (1, 2, 3):
        writer.add_scalar("loss/val", 99.0, epoch)
        writer.add_scalar("lr/gone", 1.0, epoch)
    writer.close()
    (old,) = stale.iterdir()
    old.rename(tb / "events.out.tfevents.0000000001.host.1.0")
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = _scalars(acc)
    assert [s for s, _ in scalars["loss/val"]] == [1, 2]
    assert 99.0 not in [v for _, v in scalars["loss/val"]]
    assert scalars.get("lr/gone", []) == []
    served = plugin_event_accumulator.EventAccumulator(str(tb))
    served.Reload()
    assert [(t.step, tensor_util.make_ndarray(t.tensor_proto).item()) for t in served.Tensors("loss/val")] == \
        [(s, pytest.approx(v)) for s, v in scalars["loss/val"]]
    assert "lr/gone" not in served.Tags()["tensors"] or not served.Tensors("lr/gone")


def test_killed_between_commit_and_event_resume_writes_the_epoch(tmp_path):
    """The commit of epoch 1 landed, its events did not (the tb folder lost): the resume writes it."""
    config = _config(1)
    run = create_run(tmp_path / "runs", config.to_dict(), run_id="20240101-000000-tb-lost")
    assert fit(config, run).status == "finished"
    shutil.rmtree(run.path / TB_DIR)
    assert fit(TrainConfig.from_dict(extend_run(run, 2)), run, resume=True).status == "finished"
    acc = _read(run)
    _assert_matches_metrics(run, acc)
    assert [s for s, _ in _scalars(acc)["accuracy/val"]] == [1, 2]


def test_unwritable_tb_folder_never_fails_the_training(tmp_path, caplog):
    config = _config(2)
    run = create_run(tmp_path / "runs", config.to_dict(), run_id="20240101-000000-tb-file")
    (run.path / TB_DIR).write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="engine.runs.tensorboard"):
        result = fit(config, run)
    assert result.status == "finished" and result.epochs_done == 2
    assert [r["epoch"] for r in run.metrics()] == [1, 2]
    assert run.checkpoint("best").is_file()
    warnings = [r for r in caplog.records if r.name == "engine.runs.tensorboard"]
    assert len(warnings) == 1 and "training goes on" in warnings[0].getMessage()
    assert (run.path / TB_DIR).read_text() == "not a folder"


def test_no_tensorboard_package_never_fails_the_training(tmp_path, caplog, monkeypatch):
    # every import of the package fails, as if it were not installed (None in sys.modules: ImportError)
    for name in ["tensorboard", "torch.utils.tensorboard", "torch.utils.tensorboard.summary",
                 *[m for m in sys.modules if m.startswith(("tensorboard.", "torch.utils.tensorboard."))]]:
        monkeypatch.setitem(sys.modules, name, None)
    config = _config(1)
    run = create_run(tmp_path / "runs", config.to_dict(), run_id="20240101-000000-tb-missing")
    with caplog.at_level(logging.WARNING, logger="engine.runs.tensorboard"):
        result = fit(config, run)
    assert result.status == "finished"
    warnings = [r for r in caplog.records if r.name == "engine.runs.tensorboard"]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0].getMessage()
    assert not (run.path / TB_DIR).exists()
