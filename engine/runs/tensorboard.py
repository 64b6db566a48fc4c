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
START at step 0, which makes TensorBoard's Python readers drop what came before it (the default Rust
data server drops a tag's later steps whenever a step repeats), so the later values win.
The cost: replayed epochs carry the wall time of the resume (the Step axis, the epoch, is exact).

The writer never breaks or slows a training: the import is lazy (+4.4 MB RSS in a training process,
measured with psutil), an epoch's write and flush take well under a millisecond (a start replaying
300 epochs about 0.1 s), and the first failure (package missing, disk full, ``tb`` not a folder) is
logged once (a warning on stderr: a background run's log.txt), after which this run writes no
more events.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
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
               "macro_f1/val": row.get("val_macro_f1"), "balanced_accuracy/val": row.get("val_balanced_acc"),
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
        self._file: EventFile | None = None
        self._failed = False

    def __call__(self, event: Event) -> None:
        if self._failed:
            return
        try:
            if isinstance(event, RunStarted):
                self._start()
            elif self._file is None:
                return
            elif isinstance(event, EpochEnded):
                self._epoch(self._file, event.to_dict())
                self._file.flush()  # one epoch = about a kilobyte; on disk before the next epoch starts
            elif isinstance(event, RunFinished):
                self._finish(self._file, event)
        except Exception as exc:  # noqa: BLE001 - nothing here may stop a training
            self._give_up(exc)

    # ------------------------------------------------------------------ the steps
    def _start(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.close()
        earlier = event_files(self.dir)
        self._file = file = EventFile(self.dir, after=earlier)
        for row in self.run.metrics():  # the committed epochs (a resume rewrote the file from its commit)
            self._epoch(file, row)
        exp, ssi, _ = hparams(config_hparams(self.run.config()), {m: 0.0 for m in HPARAM_METRICS})
        file.add_summary(exp)
        file.add_summary(ssi)
        file.flush()
        for path in earlier:  # replaced by the replay above
            path.unlink(missing_ok=True)

    @staticmethod
    def _epoch(file: EventFile, row: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(row).items():
            file.add_scalar(tag, value, int(row["epoch"]))

    def _finish(self, file: EventFile, event: RunFinished) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = max(event.epochs_done, 0)
        if event.best_val_acc is not None:
            file.add_scalar("best/val_accuracy", float(event.best_val_acc), step)
        if event.best_epoch is not None:
            file.add_scalar("best/epoch", float(event.best_epoch), step)
        _, _, sei = hparams({}, {})  # STATUS_SUCCESS; any other end says so
        if event.status != "finished":
            sei.value[0].metadata.plugin_data.content = _session_end("STATUS_FAILURE")
        file.add_summary(sei)
        self.close()

    # ------------------------------------------------------------------ helpers
    def _give_up(self, exc: Exception) -> None:
        self._failed = True
        why = ("the tensorboard package is not installed: pip install tensorboard" if isinstance(exc, ImportError)
               else f"{type(exc).__name__}: {exc}")
        log.warning("TensorBoard logging of run %s stopped (%s); the training goes on.", self.run.run_id, why)
        self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - already given up or finishing; the training goes on
                pass


class EventFile:
    """One TensorBoard event file, written synchronously: TensorBoard's record format (its
    RecordWriter), summaries built by ``torch.utils.tensorboard.summary``. Not SummaryWriter: its
    writer thread would print a failure's traceback from that thread besides our one line, and stay
    running when a training raises. Named to sort after ``after`` (TensorBoard reads a folder's
    files in name order), and opened by a SessionLog START at step 0: a reader drops what earlier
    files said, so the replay in this file is what TensorBoard shows."""

    def __init__(self, folder: Path, after: list[Path]):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import scalar

        self._event, self._scalar = Event, scalar
        folder.mkdir(exist_ok=True)
        stamp = max([int(time.time())] + [_stamp(p) + 1 for p in after])
        self.path = folder / f"{EVENT_FILE_PREFIX}{stamp:010d}.{socket.gethostname()}.{os.getpid()}"
        self._records = RecordWriter(self.path.open("xb"))
        self.add(Event(file_version="brain.Event:2"))
        self.add(Event(step=0, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add(self, event: Any) -> None:
        event.wall_time = event.wall_time or time.time()
        self._records.write(event.SerializeToString())

    def add_summary(self, summary: Any, step: int = 0) -> None:
        self.add(self._event(summary=summary, step=step))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_summary(self._scalar(tag, value), step)

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def event_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(EVENT_FILE_PREFIX))


def _stamp(path: Path) -> int:
    head = path.name[len(EVENT_FILE_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _session_end(status: str) -> bytes:
    """The HParams plugin's SessionEndInfo with this status, as plugin data."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status))
    return plugin_data_pb2.HParamsPluginData(session_end_info=info, version=0).SerializeToString()
