"""The end of a finished run, as ``fit`` and a race's lane both end one: the best checkpoint is loaded
once, then evaluated on the held-out test split (when there is one) and calibrated on the validation
split (temperature and the open-set rule: engine/training/calibration.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from engine.runs.checkpoint_file import load_weights
from engine.training.calibration import calibrate_best
from engine.training.epoch import evaluate

if TYPE_CHECKING:
    from engine.runs.store import RunDir
    from engine.training.setup import Prepared
    from engine.training.trainer import Trainer


def evaluate_finished(prep: Prepared, runner: Trainer, run: RunDir | None) -> dict[str, Any] | None:
    """Test split and calibration of the best checkpoint (the last weights when there is no run folder
    or no best yet); returns the test result, also recorded as the run's status ``test``, or None."""
    checkpoint, epoch = "last", None
    if run is not None and run.checkpoint("best").is_file():
        runner.module.load_state_dict(load_weights(run.checkpoint("best")))
        checkpoint, epoch = "best", (run.checkpoint_meta("best") or {}).get("epoch")
    test = test_evaluation(prep, runner, run, checkpoint, epoch)
    if checkpoint == "best":
        calibrate_best(prep, runner, run, epoch)  # never fails the run
    return test


def test_evaluation(prep: Prepared, runner: Trainer, run: RunDir | None, checkpoint: str,
                    epoch: int | None) -> dict[str, Any] | None:
    """The held-out test split, evaluated once with the weights in ``runner.module``; recorded in the
    run's status.json as ``test``. None: no test split."""
    if prep.test_ds is None or not len(prep.test_ds):
        return None
    loader = DataLoader(prep.test_ds, shuffle=False, batch_size=runner.batches.micro_batch, num_workers=0)
    loss, acc = evaluate(runner.module, loader, runner.device, runner.dtype, runner.channels_last)
    result = {"acc": acc, "loss": loss, "images": len(prep.test_ds), "checkpoint": checkpoint, "epoch": epoch,
              "unreadable": [{"file": src, "reason": why} for src, why in prep.test_ds.failed]}
    if run is not None:
        run.write_status(test=result)
    return result
