"""One Ray Train worker of a cluster run: the engine's own ``fit``, on the process group Ray Train made.

Ray Train's TorchTrainer starts N workers and initialises torch.distributed among them (gloo on
CPU, NCCL on GPU); each runs ``train_worker``, which joins that group as a ``Ranks``
(engine/training/distributed.py) and calls ``fit`` exactly as a torchrun rank does: the same
batch sharding, validation sums and checkpoints as ``--nproc`` on one machine.

Rank 0 records into its own copy of the shipped run folder (``<stage>/runs/<id>``) and hands
the driver (engine/cluster/job.py) everything the app needs, through the job's mailbox actor: its
events, the files of each commit (after the commit, before the epoch's metrics line), and at the
end the fields of its status.json the app's copy lacks. A cancel reaches it through the mailbox too.
Nothing here needs a filesystem shared between the cluster's machines or with the app.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

# files of the job's run folder that never go back: the app's own copies are made from the events
NOT_RETURNED = {"status.json", "events.jsonl", "metrics.jsonl", "log.txt", "cancel", "config.json"}
# status.json fields written by the job's fit that the app's copy is given at the end
STATUS_RETURNED = ("split", "test", "calibration", "unreadable")
STEP_EVERY_S = 1.0  # progress events at most this often (the log is read back whole by the app)
STOP_EVERY_S = 0.5  # how often rank 0 asks the mailbox whether the run was cancelled


def _files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
            if p.is_file() and p.name not in NOT_RETURNED and not p.name.startswith(".")}


class Relay:
    """Rank 0's emit sink: events and finished files into the mailbox, in order (one caller's calls to
    an actor run in the order made)."""

    def __init__(self, mailbox: Any, folder: Path):
        self.mailbox, self.folder = mailbox, folder
        self.sent = _files_of(folder)  # what the job started with is on the app's side already
        self._last_step = 0.0
        self._pending: list[Any] = []

    def _put(self, item: Any) -> None:
        self._pending.append(self.mailbox.put.remote(item))
        if len(self._pending) > 64:
            import ray

            ray.get(self._pending[:-8])
            self._pending = self._pending[-8:]

    def files(self) -> None:
        """Files that changed since they were last handed over (a commit, the calibration at the end)."""
        now = _files_of(self.folder)
        for name, stamp in sorted(now.items()):
            if self.sent.get(name) != stamp:
                self._put(("file", name, (self.folder / name).read_bytes()))
                self.sent[name] = stamp

    def __call__(self, event: Any) -> None:
        from engine.runs.events import EpochEnded, RunFinished, StepLogged

        if isinstance(event, StepLogged):
            now = time.monotonic()
            if now - self._last_step < STEP_EVERY_S and event.step != event.steps:
                return
            self._last_step = now
        if isinstance(event, (EpochEnded, RunFinished)):  # the commit is on disk before these are emitted
            self.files()
        if isinstance(event, RunFinished):
            from engine.core.files import read_json

            status = read_json(self.folder / "status.json", {}) or {}
            self._put(("status", {k: status[k] for k in STATUS_RETURNED if k in status}))
        self._put(("event", event.to_dict()))

    def flush(self) -> None:
        import ray

        ray.get(self._pending)
        self._pending = []


class MailboxStop:
    """``should_stop`` of rank 0: the driver's cancel flag, asked at most every STOP_EVERY_S."""

    def __init__(self, mailbox: Any):
        self.mailbox, self._last, self._stop = mailbox, 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._last >= STOP_EVERY_S:
            import ray

            self._last = now
            self._stop = bool(ray.get(self.mailbox.stop_requested.remote()))
        return self._stop


def _on_the_cluster(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """Paths the stage made relative (data and a weights file that travelled), on this worker's node."""
    out = dict(config)
    for key in ("data", "weights"):
        value = out.get(key)
        if isinstance(value, str) and value.startswith(("data/", "weights/")) and (root / value).exists():
            out[key] = str(root / value)
    return out


def _own_copy(shipped: Path, spec: dict[str, Any], rank: int) -> Path:
    """This worker's own copy of the shipped run folder, in its node's temp folder: the working_dir Ray
    unpacked is shared by the jobs that uploaded the same content and is not ours to write in; and no
    rank relies on another's files (a zip is extracted by each, the rest rank 0 broadcasts)."""
    import shutil
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"workbench-{spec['run_id']}-{spec.get('attempt', 1)}-rank{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    target = folder / spec["run_id"]
    shutil.copytree(shipped, target)
    return target


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop_config`` holds the job spec and the mailbox."""
    import ray
    import ray.train

    from engine.core.paths import PROJECT_ROOT

    os.environ["WORKBENCH_DATA"] = str(PROJECT_ROOT / "data")
    os.environ["WORKBENCH_RUNS"] = str(PROJECT_ROOT / "runs")
    from dataclasses import replace

    from engine.cluster.fetch import fetch_dataset, is_url
    from engine.config import TrainConfig
    from engine.core.errors import EngineError
    from engine.runs.events import no_emit
    from engine.runs.store import RunDir
    from engine.training.distributed import join_ranks
    from engine.training.loop import fit

    spec, mailbox = loop_config["spec"], loop_config["mailbox"]
    ctx = ray.train.get_context()
    config = TrainConfig.from_dict(_on_the_cluster(spec["config"], PROJECT_ROOT))
    threads = int(float(os.environ.get("OMP_NUM_THREADS", "0") or 0)) or None
    ranks = join_ranks(config.device, ctx.get_local_rank(), ctx.get_local_world_size(), threads)
    mailbox.put.remote(("worker", {"rank": ranks.rank, "world": ranks.world, "pid": os.getpid(),
                                   "node": ray.util.get_node_ip_address()}))
    run = RunDir(_own_copy(PROJECT_ROOT / "runs" / spec["run_id"], spec, ranks.rank))
    relay = Relay(mailbox, run.path) if ranks.main else None
    try:
        if is_url(config.data):  # named by URL: each worker fetches its own copy (engine/cluster/fetch.py)
            config = replace(config, data=str(fetch_dataset(config.data, run.path.parent / "data")))
        fit(config, run, emit=relay or no_emit, resume=bool(spec["resume"]), ranks=ranks,
            should_stop=MailboxStop(mailbox) if ranks.main else (lambda: False))
    except EngineError as exc:  # a clear refusal (bad data, a setting the model refuses): said once, by the driver
        ray.get(mailbox.put.remote(("refused", {"rank": ranks.rank, "reason": str(exc)})))
        raise
    finally:
        if relay is not None:
            relay.flush()
        import shutil

        shutil.rmtree(run.path.parent, ignore_errors=True)  # everything it had is in the driver's hands
