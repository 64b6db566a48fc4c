"""Several processes for one run: the launcher (``launch_ranks``) and each process's entry (``rank_main``).

The launcher is the process that holds the device lock, the queue place and the heartbeat
(engine/training/run.py); it starts ``nproc`` ranks with torchrun's own launcher
(``torch.distributed.run``, standalone rendezvous on this machine), each running
``python -m engine train --run-dir RUN --_rank-worker``. Rank 0 records the run as one process
would; when a rank dies, torchrun stops the others and the launcher writes why in the run's status
("rank 1 of 2 exited with signal SIGKILL"), so a crash never leaves a run that reads as running.

Several machines: start torchrun yourself on each (``--nnodes``, ``--rdzv-endpoint``) with the same
``python -m engine train ... --_rank-worker`` arguments; rank 0 creates the run folder
(docs/scaling-out.md).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable

from engine.core.errors import EngineError
from engine.core.paths import PROJECT_ROOT
from engine.runs.status import ACTIVE_STATES
from engine.training.loop import RunResult

if TYPE_CHECKING:
    import argparse

    from engine.config import TrainConfig
    from engine.runs.store import RunDir

LAUNCHED = "WORKBENCH_LAUNCHED"  # set for ranks the launcher started: it keeps the heartbeat and the final word
ENGINE_ERROR = "EngineError: "  # a rank's clear message to the user, through torchrun's error file


def launch_ranks(run: RunDir, config: TrainConfig, resume: bool) -> RunResult:
    """Train ``run`` on ``config.nproc`` processes of this machine and wait for them."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    from engine.core.device import resolve_device
    from engine.training.distributed import check_distributed

    check_distributed(config, resolve_device(config.device))
    started = time.perf_counter()
    n = config.nproc
    argv = ["--standalone", "--nproc-per-node", str(n), "--module", "engine", "train", "--run-dir", str(run.path),
            "--out", str(run.path.parent), "--_rank-worker"] + (["--resume-existing"] if resume else [])
    env = {LAUNCHED: "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n)),  # torchrun's default: 1
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # torchrun's own reports (failures, shutdowns) are said in one line below instead
    quiet = [logging.getLogger(name) for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]
             if name.startswith("torch.distributed.elastic")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    failed = ""
    try:
        torchrun(parse_args(argv))
    except ChildFailedError as exc:
        failed = failure_reason(exc.failures, n)
        if _refused(exc.failures) and not run.metrics() and not run.train_state_path.is_file():
            raise EngineError(failed) from None  # refused before training, as one process is (nothing to keep)
    except SignalException as exc:  # SIGTERM/SIGINT reached torchrun: it stopped the ranks
        raise KeyboardInterrupt from exc
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    status = run.status()
    if not failed and status.state in ACTIVE_STATES:  # all exited cleanly, yet rank 0 never said how it ended
        failed = f"the {n} training processes ended without recording a result; see the run's log"
    if failed:  # the run began: its folder stays, with the reason (a refusal before this raises instead)
        run.write_status(state="failed", reason=failed, finished_at=time.time())
        status = run.status()
    history = run.metrics()
    return RunResult(status=status.state, reason=status.reason, run_dir=str(run.path), best_epoch=status.best_epoch,
                     best_val_acc=status.best_val_acc, epochs_done=len(history),
                     seconds=time.perf_counter() - started, history=history, feature_cache=used_cache(run))


def failure_reason(failures: dict[int, Any], world: int) -> str:
    """Why the ranks ended, in one sentence: a rank's own clear message when it had one; otherwise
    the rank whose death looks like the cause (killed by a signal other than torchrun's SIGTERM, or
    failing on its own, before one that lost its peers), the first of those."""
    for _rank, failure in sorted(failures.items()):
        message = failure.message if isinstance(failure.message, str) else ""
        if message.startswith(ENGINE_ERROR):
            return message[len(ENGINE_ERROR):]

    def consequence(rank: int) -> tuple[bool, bool, bool, int, int]:
        """Sorts causes first: a rank that lost its peers, or was stopped (SIGTERM is what torchrun
        sends the survivors), is the consequence of another's death, not its cause."""
        f = failures[rank]
        text = f.message if isinstance(f.message, str) else ""
        lost = any(s in text for s in ("Connection closed by peer", "remote worker", "DistBackendError"))
        return lost, f.exitcode == -signal.SIGTERM, f.exitcode >= 0, f.timestamp, rank

    rank = min(failures, key=consequence)
    failure = failures[rank]
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    if isinstance(failure.message, str) and failure.message.startswith("internal error"):
        how += f" after an {failure.message}"
    return (f"rank {rank} of {world} exited with {how}; the other processes were stopped "
            "(their output is in the run's log). The last finished epoch is kept: resume the run.")


def _refused(failures: dict[int, Any]) -> bool:
    """A rank said why in a clear message (an EngineError: bad data, a setting the model refuses)."""
    return any(isinstance(f.message, str) and f.message.startswith(ENGINE_ERROR) for f in failures.values())


def used_cache(run: RunDir) -> bool:
    """Whether the last start used the feature cache (its RunStarted event, written by rank 0)."""
    used = False
    try:
        with run.events_path.open() as fh:
            for line in fh:
                if '"RunStarted"' in line:
                    used = bool(json.loads(line).get("feature_cache"))
    except (OSError, ValueError):  # best effort: the flag only labels the result
        pass
    return used


def record_rank_error(message: str) -> None:
    """Hand ``message`` to the launcher through the error file torchrun gives each rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:
        pass


def rank_main(args: argparse.Namespace, *, config_from_args: Callable[[argparse.Namespace], Any],
              main_emit: Any) -> int:
    """One rank: join the group, train (rank 0 records), leave. ``--run-dir``: the launcher's run;
    without it (torchrun started by hand, e.g. on several machines) rank 0 creates the run from the options.
    The command line hands in how it reads a config from its options and rank 0's progress printer
    (this layer never imports the CLI)."""
    from engine.config import TrainConfig
    from engine.runs.events import no_emit
    from engine.runs.process import Heartbeat
    from engine.runs.store import create_run, open_run
    from engine.training.distributed import start_ranks, stop_ranks
    from engine.training.loop import fit

    launched = os.environ.get(LAUNCHED) == "1"
    run: RunDir | None = None
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.run_dir:
            run = open_run(args.out, args.run_dir)
            config = TrainConfig.from_dict(run.config())
        else:  # the world torchrun made is the run's: its config says so, and a resume launches as many
            args.nproc = int(os.environ.get("WORLD_SIZE", "1"))
            config = config_from_args(args)
        ranks = start_ranks(config.device)
        try:
            resume = ranks.broadcast(bool(run is not None and (args.resume_flag or run.train_state_path.is_file())))
            if run is None and ranks.main:
                run = create_run(args.out, config.to_dict(), owner=os.getpid())
                print(run.path, flush=True)
            beat = Heartbeat(run.write_status) if ranks.main and run is not None and not launched else nullcontext()
            with beat:
                if ranks.main and run is not None and not launched:
                    run.write_status(state="running", reason="", queue_position=None)
                emit = main_emit if ranks.main else no_emit
                result = fit(config, run, emit=emit, resume=resume, ranks=ranks)
        finally:
            stop_ranks()
    except EngineError as exc:
        record_rank_error(ENGINE_ERROR + str(exc))
        if main and run is not None and not launched:
            run.write_status(state="failed", reason=str(exc), finished_at=time.time())
        if not main or launched:
            return 2  # the launcher says it, once (every rank usually meets the same refusal)
        raise
    except KeyboardInterrupt:
        if launched:  # Ctrl-C reached every process: the launcher says it, once, and records the cancel
            return 130
        raise
    except Exception as exc:
        record_rank_error(f"internal error ({type(exc).__name__}: {str(exc)[:200]})")
        if main and run is not None and not launched:
            run.write_status(state="failed", reason=f"internal error ({type(exc).__name__}); see the log",
                             finished_at=time.time())
        raise
    return 0 if result.status in ("finished", "cancelled", "diverged") else 1
