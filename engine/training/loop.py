"""``fit``: a whole run, the textbook loop with the pieces a real run needs named.

    prepare (data + model) -> resume point -> set_up (plan, loaders, optimizer, feature cache)
    for each epoch: unfreeze per plan -> train one epoch -> evaluate -> commit -> early stopping

A cancel (or a kill) never leaves a half-written file: each epoch ends in one atomic commit
(training/checkpoint.py) and a resumed run continues the same curves.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine.core.device import flush_denormals, seed_everything
from engine.core.memory import reuse_freed_memory
from engine.data.overrides import read_overrides
from engine.runs.events import PlanChosen, RunFinished, RunStarted, no_emit
from engine.runs.recorder import RunRecorder
from engine.training.auto_plan import is_pending
from engine.training.checkpoint import Checkpointer
from engine.training.epoch import Diverged
from engine.training.finish import evaluate_finished
from engine.training.setup import Prepared, describe_test, prepare, record_split, set_up
from engine.training.state import TrainState

if TYPE_CHECKING:
    from engine.config import TrainConfig
    from engine.runs.events import Emit
    from engine.runs.store import RunDir
    from engine.training.distributed import Ranks


def fit(config: TrainConfig, run: RunDir | None = None, *, emit: Emit = no_emit,
        should_stop: Callable[[], bool] | None = None, resume: bool = False, ranks: Ranks | None = None) -> RunResult:
    """Train per ``config``; with ``run``, record everything there; ``resume`` continues its last commit.

    ``ranks``: this process is one of several training together (engine/training/distributed.py);
    only rank 0 records to ``run`` (the others read its data decisions from it, when they see it)."""
    started = time.perf_counter()
    data_run = run
    if ranks is not None and not ranks.main:
        run, emit = None, no_emit
    reuse_freed_memory()  # faster steps and a lower peak in a training process (core/memory.py)
    flush_denormals()  # faster CPU steps (core/device.py)
    sink: Emit = RunRecorder(run, emit) if run is not None else emit
    stop = should_stop or (run.cancel_requested if run is not None else (lambda: False))
    seed_everything(config.seed)
    checkpointer = Checkpointer(run, config.monitor)
    commit = checkpointer.resume_point() if resume and (run is not None or ranks is None) else None
    if ranks is not None and resume:
        commit = ranks.broadcast(commit)  # rank 0 read it; the others take its optimizer state and counters
    # a zip is extracted into the run folder: by rank 0, before the others read it (only rank 0 writes)
    in_turn = ranks is not None and str(config.data).lower().endswith(".zip")
    if in_turn and not ranks.main:
        ranks.barrier()
    prep = prepare(config, work_dir=str(data_run.path) if data_run else None,
                   weights="none" if commit else None,  # resumed weights come from the commit
                   # a fresh run trains with the dataset's decisions as they are now; a resumed one with its own
                   overrides=None if commit else read_overrides(config.data))
    if in_turn and ranks.main:
        ranks.barrier()
    if commit and run is not None:  # other ranks get rank 0's weights when DDP wraps the model
        checkpointer.restore(prep.handle, commit)
    record_split(prep, run)
    state = TrainState.start(config.monitor, config.min_delta, config.patience, commit)
    if is_pending(config.auto_plan) and not commit:  # --strategy auto: the plan is chosen on this data, now
        config = _choose_plan(config, prep, sink, stop, ranks)
        if config is None:
            return RunResult.record(sink, "cancelled", "cancelled while choosing the plan", state, started, False,
                                    run)
    runner = set_up(config, prep, state, commit, stop, ranks)

    def finish(status: str, reason: str) -> RunResult:
        if status == "finished" and runner is not None and (ranks is None or ranks.main):
            # the best checkpoint: the held-out split once, then calibrated (never fails the run)
            if test := evaluate_finished(prep, runner, run):
                reason = f"{reason}; {describe_test(test)}"
        return RunResult.record(sink, status, reason, state, started, runner is not None and runner.cached, run)

    if runner is None:
        return finish("cancelled", "cancelled while computing features")
    device, batches = str(runner.device), runner.batches.describe()
    if ranks is not None:
        device, batches = ranks.describe(runner.device, batches, config.batch_size)
    sink(RunStarted(run_id=run.run_id if run else "-", device=device, epochs=config.epochs,
                    steps_per_epoch=runner.steps, train_images=len(prep.train_ds), val_images=len(prep.val_ds),
                    trainable_params=runner.report.trainable_params, feature_cache=runner.cached,
                    skipped=prep.skipped, micro_batch=runner.batches.micro_batch,
                    batches=batches, precision=runner.precision))
    first = state.epoch + 1
    for epoch in range(first, config.epochs + 1):
        if epoch > first or commit:
            runner.unfreeze(epoch)
        try:
            ended = runner.run_epoch(epoch, state, sink, started, stop)
        except Diverged as exc:
            return finish("diverged", f"epoch {epoch}: {exc}")
        if ended is None:
            return finish("cancelled", f"cancelled during epoch {epoch}")
        improved = state.finish_epoch(ended, runner.steps)
        checkpointer.commit(prep.handle, runner.optimizer, ended, improved, state, sink)
        sink(ended)  # the metrics line follows the commit; a resume rewrites it from the commit anyway
        if state.early.should_stop() and epoch < config.epochs:
            return finish("finished", state.early.reason())
    return finish("finished", _completed(prep, run))


def _choose_plan(config: TrainConfig, prep: Prepared, sink: Emit, stop: Callable[[], bool],
                 ranks: Ranks | None) -> TrainConfig | None:
    """``--strategy auto`` (engine/training/auto_plan.py): the config with the chosen plan; None: cancelled.
    Rank 0 chooses, every rank trains its pick; the PlanChosen event carries it into the run's config.json
    (runs/recorder.py: a resume, an export and the exported script train that plan)."""
    from engine.training.auto_plan import choose_plan

    choice = choose_plan(config, prep, stop) if ranks is None or ranks.main else None
    if ranks is not None:
        choice = ranks.broadcast(choice)
    if choice is None:
        return None
    config = replace(config, plan=choice.plan, auto_plan=choice.record())
    sink(PlanChosen(plan=choice.picked, summary=choice.summary(), record=config.auto_plan))  # into config.json
    return config


def _completed(prep: Prepared, run: RunDir | None) -> str:
    """'completed', naming files that broke after validation (replaced by other images; workers=0)."""
    failed = prep.train_ds.failed + prep.val_ds.failed
    if not failed:
        return "completed"
    if run is not None:
        run.write_status(unreadable=[{"file": Path(src).name, "reason": why} for src, why in failed])
    return (f"completed; {len(failed)} file(s) became unreadable during training and were replaced by other "
            "images (listed in status.json)")


@dataclass
class RunResult:
    status: str
    reason: str
    run_dir: str | None
    best_epoch: int | None
    best_val_acc: float | None
    epochs_done: int
    seconds: float
    history: list[dict[str, Any]]
    feature_cache: bool

    def summary(self) -> str:
        """How the run ended, in words for the command line's one line: the best validation accuracy when an
        epoch finished, else that none did (never "None"); the state when it did not finish."""
        acc = self.best_val_acc
        if isinstance(acc, (int, float)) and acc == acc:
            best = f"best val acc {acc:.4f}" + (f" (epoch {self.best_epoch})" if self.best_epoch else "")
        else:
            best = "no epoch finished"
        return best if self.status == "finished" else f"{self.status}, {best}"

    @classmethod
    def record(cls, sink: Emit, status: str, reason: str, state: TrainState, started: float, cached: bool,
               run: RunDir | None) -> RunResult:
        """How the run ended: said to the sink (RunFinished) and returned."""
        seconds = time.perf_counter() - started
        early = state.early
        sink(RunFinished(status=status, reason=reason, best_epoch=early.best_epoch, best_val_acc=early.best_val_acc,
                         epochs_done=state.epoch, seconds=seconds))
        return cls(status=status, reason=reason, run_dir=str(run.path) if run else None, best_epoch=early.best_epoch,
                   best_val_acc=early.best_val_acc, epochs_done=state.epoch, seconds=seconds,
                   history=list(state.history), feature_cache=cached)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

