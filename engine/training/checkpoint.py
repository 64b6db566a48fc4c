"""The per-epoch commit of a run and its repair after a crash.

``last_state.pt`` (weights, optimizer, counters, metrics of one epoch) is written
atomically first; everything after it is derived and rebuilt from it on resume.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import EngineError, RunError
from engine.core.files import atomic_write_bytes, read_json
from engine.runs.checkpoint_file import load_weights, save_weights
from engine.runs.events import CheckpointSaved

if TYPE_CHECKING:
    from engine.models.factory import ModelHandle
    from engine.runs.events import Emit, EpochEnded
    from engine.runs.store import RunDir
    from engine.training.state import TrainState


def _checkpoint_meta(handle: ModelHandle, row: dict[str, Any], monitor: str) -> dict[str, Any]:
    return {"epoch": row["epoch"], "val_loss": row["val_loss"], "val_acc": row["val_acc"],
            "train_loss": row["train_loss"], "class_names": handle.spec.class_names,
            "monitor": monitor, "spec": handle.spec.to_dict()}


def save_commit(run: RunDir, handle: ModelHandle, optimizer, ended: EpochEnded, improved: bool,
                state: TrainState, monitor: str, sink: Emit) -> None:
    """One commit per epoch: ``last_state.pt`` (written atomically) holds the weights, optimizer,
    counters and metrics of this epoch together. Everything after it (last/best safetensors, their
    JSON, the metrics line) is derived and is rebuilt from it by ``repair_after_crash`` if a kill
    lands in between. A kill before the commit leaves the previous epoch's commit intact."""
    weights = handle.module.state_dict()
    meta = _checkpoint_meta(handle, ended.to_dict(), monitor)
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in weights.items()},
                "optimizer": optimizer.state_dict(), "group_layout": [g["name"] for g in optimizer.param_groups],
                "epoch": ended.epoch, "step": state.step, "history": state.history, "meta": meta,
                **state.early.tracking()}, buf)
    atomic_write_bytes(run.train_state_path, buf.getvalue())  # the commit
    save_weights(run.checkpoint("last"), weights, meta)
    sink(CheckpointSaved(epoch=ended.epoch, kind="last", path=str(run.checkpoint("last")),
                         val_loss=ended.val_loss, val_acc=ended.val_acc))
    if improved:
        save_weights(run.checkpoint("best"), weights, meta)
        sink(CheckpointSaved(epoch=ended.epoch, kind="best", path=str(run.checkpoint("best")),
                             val_loss=ended.val_loss, val_acc=ended.val_acc))


def read_commit(run: RunDir) -> dict[str, Any]:
    """The last committed epoch of a run (weights, optimizer, counters, metrics), or a clear error."""
    if not run.train_state_path.is_file():
        raise EngineError("Nothing to resume: the run has no completed epoch yet.")
    try:
        state = torch.load(run.train_state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated by something outside the engine, or not ours
        raise RunError(f"Run {run.run_id}: last_state.pt is damaged ({type(exc).__name__}); "
                       "it cannot be resumed.") from exc
    if not isinstance(state, dict) or "epoch" not in state or "optimizer" not in state:
        raise RunError(f"Run {run.run_id}: last_state.pt is not a resume point of this workbench.")
    if "model" not in state and not run.checkpoint("last").is_file():
        raise RunError(f"Run {run.run_id}: the weights of its last epoch are missing; it cannot be resumed.")
    return state


def repair_after_crash(run: RunDir, handle: ModelHandle, state: dict[str, Any], monitor: str) -> None:
    """Make every derived file agree with the commit: metrics hold exactly epochs 1..N once each,
    and last/best checkpoints that a kill left behind the commit are rewritten from it."""
    epoch = int(state["epoch"])
    history = state.get("history")
    if history is None:  # a commit written before history was part of it: keep lines up to N, once
        by_epoch = {m["epoch"]: m for m in run.metrics() if m["epoch"] <= epoch}
        history = [by_epoch[e] for e in sorted(by_epoch)]
        state["history"] = history
    run.rewrite_metrics(history)
    if "model" not in state:
        return
    meta = state.get("meta") or (_checkpoint_meta(handle, history[-1], monitor) if history else None)
    if meta is None:
        return
    if not _checkpoint_at(run, "last", epoch):
        save_weights(run.checkpoint("last"), state["model"], meta)
    if state.get("best_epoch") == epoch and not _checkpoint_at(run, "best", epoch):
        save_weights(run.checkpoint("best"), state["model"], meta)


def _checkpoint_at(run: RunDir, kind: str, epoch: int) -> bool:
    """Both the weights file and the JSON beside it describe ``epoch``."""

    sidecar = read_json(run.checkpoint(kind).with_suffix(".json"))
    return (run.checkpoint_meta(kind) or {}).get("epoch") == epoch and \
        isinstance(sidecar, dict) and sidecar.get("epoch") == epoch


def disk_error(exc: OSError, epoch: int | None = None) -> EngineError:
    import errno

    what = f"epoch {epoch}'s checkpoint could not be saved" if epoch else "the run's files could not be written"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EngineError(f"The disk is full: {what}. The last good checkpoint is kept; free some space and "
                           "resume the run.")
    return EngineError(f"{what[0].upper() + what[1:]} ({exc.strerror or exc}). The last good checkpoint is kept; "
                       "resume the run once this is fixed.")


class Checkpointer:
    """A run's checkpoints: the per-epoch commit, and the resume point read back from it.

    Without a run folder (a plain ``fit`` in a notebook or test) it keeps nothing.
    """

    def __init__(self, run: RunDir | None, monitor: str):
        self.run, self.monitor = run, monitor

    def resume_point(self) -> dict[str, Any] | None:
        """The last commit; None when the run stopped before its first epoch committed (it restarts)."""
        if self.run is None:
            raise EngineError("Nothing to resume: no run directory.")
        if not self.run.train_state_path.is_file():
            self.run.rewrite_metrics([])
            return None
        return read_commit(self.run)

    def restore(self, handle: ModelHandle, commit: dict[str, Any]) -> None:
        """The committed weights into the model; derived files a kill left behind are rebuilt."""
        assert self.run is not None
        trained = (commit.get("meta") or {}).get("class_names")
        if trained:  # the data may have changed since: a class added, removed or renamed
            from engine.runs.load import check_same_classes

            check_same_classes(self.run, list(trained), list(handle.spec.class_names),
                               "it cannot be resumed on that data; start a new run")
        weights = commit["model"] if "model" in commit else load_weights(self.run.checkpoint("last"))
        handle.module.load_state_dict(weights)
        repair_after_crash(self.run, handle, commit, self.monitor)

    def commit(self, handle: ModelHandle, optimizer, ended: EpochEnded, improved: bool, state: TrainState,
               sink: Emit) -> None:
        if self.run is None:
            return
        try:
            save_commit(self.run, handle, optimizer, ended, improved, state, self.monitor, sink)
        except OSError as exc:
            raise disk_error(exc, ended.epoch) from exc

