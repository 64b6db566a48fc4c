"""TensorBoard event files of a run: ``runs/<run>/tb/``, so ``tensorboard --logdir runs/`` shows one
run per run folder (named ``<run>/tb``).

Per epoch (step = the epoch number): ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``,
``lr/<stage>`` for the parameter groups of every stage that trains (see ``lr_scalars``),
``speed/images_per_s``, ``time/epoch_s``, ``model/trainable_params``.
The run's config goes to the HParams dashboard when the run starts; when it ends, ``best/val_accuracy``
and ``best/epoch`` follow (the HParams metrics, with the last ``accuracy/val`` and ``loss/val``).

A resumed run continues the same curves. Every start opens a new event file that first replays the
committed epochs (``metrics.jsonl``, which a resume has just made match its commit) and then removes
the event files of earlier starts. So the folder always describes exactly the committed epochs and
the ones after them, once each, whatever a kill left behind: epochs past the commit, an epoch whose
commit landed but whose event did not (kill -9 between the two), a torn last record. A kill between
the replay and the removal leaves both files for a moment; the new file begins with a SessionLog
START at step 0, which makes TensorBoard's reader drop what came before it, so the later values win.
The cost: replayed epochs carry the wall time of the resume (the Step axis, the epoch, is exact).

The writer never breaks or slows a training: the import is lazy (+4 MB RSS in a training process,
measured with psutil), writes go to TensorBoard's own writer thread, and the first failure (package
missing, disk full, ``tb`` not a folder) is logged once, after which this run writes no more events.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.runs.events import EpochEnded, RunFinished, RunStarted

if TYPE_CHECKING:
    from engine.runs.events import Event
    from engine.runs.store import RunDir

log = logging.getLogger(__name__)

TB_DIR = "tb"
EVENT_FILE_PREFIX = "events.out.tfevents."
HPARAM_METRICS = ("accuracy/val", "loss/val", "best/val_accuracy", "best/epoch")


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one epoch (an EpochEnded, or its metrics.jsonl line), by tag."""
    scalars = {"loss/train": row.get("train_loss"), "loss/val": row.get("val_loss"),
               "accuracy/train": row.get("train_acc"), "accuracy/val": row.get("val_acc"),
               "time/epoch_s": row.get("epoch_s") or None, "speed/images_per_s": row.get("images_per_s") or None,
               "model/trainable_params": row.get("trainable_params") or None}
    scalars.update(lr_scalars(row.get("lr") if isinstance(row.get("lr"), dict) else {}))
    return {tag: float(v) for tag, v in scalars.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def lr_scalars(lrs: dict[str, float]) -> dict[str, float]:
    """The learning rate of every parameter group, by the stage it trains: ``lr/<stage>`` stands for
    both of a stage's groups (``<stage>/decay`` and ``<stage>/no_decay`` differ only in weight decay,
    so they share one rate); groups of one stage whose rates differ, or other names, keep their own
    ``lr/<group>``."""
    by_stage: dict[str, dict[str, float]] = {}
    for name, lr in lrs.items():
        stage, _, kind = str(name).rpartition("/")
        by_stage.setdefault(stage if stage and kind in ("decay", "no_decay") else str(name), {})[name] = lr
    out: dict[str, float] = {}
    for stage, groups in by_stage.items():
        if len(set(groups.values())) == 1:
            out[f"lr/{stage}"] = next(iter(groups.values()))
        else:
            out.update({f"lr/{name}": lr for name, lr in groups.items()})
    return out


def config_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The run's config as HParams values: scalars as they are, the plan's fields as ``plan.<key>``,
    lists as compact JSON, the data source by its name only (never a server path)."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            out[key] = str(value).lower()  # a bool would read as the number 0/1
        elif isinstance(value, (int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = json.dumps(value, separators=(",", ":"))

    for key, value in config.items():
        if key == "plan" and isinstance(value, dict):
            for pkey, pvalue in value.items():
                put(f"plan.{pkey}", pvalue)
        elif key == "data" and isinstance(value, str):
            put(key, Path(value).name or value)
        else:
            put(key, value)
    return out


class TensorBoardLog:
    """Writes a run's events as TensorBoard event files; never raises, gives up after one failure."""

    def __init__(self, run: RunDir):
        self.run = run
        self.dir = run.path / TB_DIR
        self._writer: Any = None
        self._failed = False

    def __call__(self, event: Event) -> None:
        if self._failed:
            return
        try:
            if isinstance(event, RunStarted):
                self._start()
            elif self._writer is None:
                return
            elif isinstance(event, EpochEnded):
                self._epoch(event.to_dict())
                self._writer.flush()  # one epoch = a few hundred bytes; on disk before the next epoch starts
            elif isinstance(event, RunFinished):
                self._finish(event)
        except Exception as exc:  # noqa: BLE001 - nothing here may stop a training
            self._give_up(exc)

    # ------------------------------------------------------------------ the steps
    def _start(self) -> None:
        self.close()
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        earlier = self._event_files()
        # a new event file of this start, opened by a SessionLog START at step 0 (purge_step)
        self._writer = SummaryWriter(str(self.dir), purge_step=0)
        for row in self.run.metrics():  # the committed epochs (a resume rewrote the file from its commit)
            self._epoch(row)
        exp, ssi, _ = hparams(config_hparams(self.run.config()), {m: 0.0 for m in HPARAM_METRICS})
        self._writer._get_file_writer().add_summary(exp)  # as SummaryWriter.add_hparams does, minus
        self._writer._get_file_writer().add_summary(ssi)  # its extra run folder per call
        self._writer.flush()
        for path in earlier:  # replaced by the replay above
            path.unlink(missing_ok=True)

    def _epoch(self, row: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(row).items():
            self._writer.add_scalar(tag, value, int(row["epoch"]))

    def _finish(self, event: RunFinished) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = max(event.epochs_done, 0)
        if event.best_val_acc is not None:
            self._writer.add_scalar("best/val_accuracy", float(event.best_val_acc), step)
        if event.best_epoch is not None:
            self._writer.add_scalar("best/epoch", float(event.best_epoch), step)
        _, _, sei = hparams({}, {})  # STATUS_SUCCESS; any other end says so
        if event.status != "finished":
            sei.value[0].metadata.plugin_data.content = _session_end("STATUS_FAILURE")
        self._writer._get_file_writer().add_summary(sei)
        self.close()

    # ------------------------------------------------------------------ helpers
    def _event_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith(EVENT_FILE_PREFIX))

    def _give_up(self, exc: Exception) -> None:
        self._failed = True
        why = ("the tensorboard package is not installed: pip install tensorboard" if isinstance(exc, ImportError)
               else f"{type(exc).__name__}: {exc}")
        log.warning("TensorBoard logging of run %s stopped (%s); the training goes on.", self.run.run_id, why)
        self.close()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already given up or finishing; the training goes on
                pass


def _session_end(status: str) -> bytes:
    """The HParams plugin's SessionEndInfo with this status, as plugin data."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status))
    return plugin_data_pb2.HParamsPluginData(session_end_info=info, version=0).SerializeToString()
