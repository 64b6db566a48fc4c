"""The entrypoint of a cluster run's Ray job (``python -m engine.cluster.job job.json``): the driver.

It starts the run's N workers with Ray Train (engine/cluster/worker.py), keeps the mailbox actor they
report to, and relays what arrives into its own stdout, which Ray keeps as the job's log: the one
channel back to the app (engine/cluster/protocol.py), through the dashboard port alone.

What it holds, and when it prints it:

- events: at once (the app's curves follow live), except the run's ``RunFinished``, held until every
  file is printed, so the app never reads "finished" before the best weights are there;
- files (each commit's, the calibration's at the end): kept on the driver's disk, the latest of each,
  and printed when the job ends however it ends: finished, a worker killed (the driver outlives its
  workers, so the last finished epoch still comes back), or a stop (SIGTERM from ``ray job stop``,
  which first asks rank 0 to stop at its next step). At most every ``SHIP_EVERY_S`` they are also
  printed while training, so a lost driver loses at most that much;
- ``end``: the last line, how the job ended in one sentence.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.cluster.protocol import Printer

SHIP_EVERY_S = float(os.environ.get("WORKBENCH_CLUSTER_SHIP_EVERY_S", "600"))
DRAIN_S = 0.5


def _mailbox_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Mailbox:
        """Where the workers leave what the driver prints; and the driver's cancel, for rank 0 to read."""

        def __init__(self) -> None:
            self.items: list[Any] = []
            self.stop = False

        def put(self, item: Any) -> None:
            self.items.append(item)

        def take(self) -> list[Any]:
            items, self.items = self.items, []
            return items

        def request_stop(self) -> None:
            self.stop = True

        def stop_requested(self) -> bool:
            return self.stop

    return Mailbox


class Driver:
    def __init__(self, spec: dict[str, Any], printer: Printer):
        self.spec, self.say = spec, printer
        self.held = Path(tempfile.mkdtemp(prefix="workbench-held-", suffix=f"-{os.getpid()}"))
        self.unprinted: set[str] = set()
        self.finished: dict[str, Any] | None = None  # the RunFinished event, held
        self.status: dict[str, Any] = {}
        self.workers: dict[int, dict[str, Any]] = {}  # pid -> rank, world, node
        self.refusal = ""
        self.stopping = threading.Event()
        self.last_ship = time.monotonic()
        self._lock = threading.Lock()

    def take(self, items: list[Any]) -> None:
        for kind, *rest in items:
            if kind == "event":
                event = rest[0]
                if event.get("event") == "RunFinished":
                    self.finished = event
                else:
                    self.say({"type": "event", "event": event})
            elif kind == "file":
                name, data = rest
                (self.held / name).write_bytes(data)
                self.unprinted.add(name)
            elif kind == "status":
                self.status.update(rest[0])
            elif kind == "worker":
                self.workers[rest[0]["pid"]] = rest[0]
            elif kind == "refused" and not self.refusal:
                self.refusal = rest[0]["reason"]
        if self.unprinted and time.monotonic() - self.last_ship > SHIP_EVERY_S:
            self.print_files()

    def print_files(self) -> None:
        with self._lock:
            for name in sorted(self.unprinted):
                self.say.file(name, (self.held / name).read_bytes())
            self.unprinted.clear()
            self.last_ship = time.monotonic()

    def named(self, rank: int | None = None, text: str = "") -> str:
        """A worker as 'worker rank R of N (pid P on NODE)', by its rank or a pid in ``text``."""
        by_rank = {w["rank"]: (pid, w) for pid, w in self.workers.items()}
        found = by_rank.get(rank) if rank is not None else None
        if found is None:
            found = next(((int(p), self.workers[int(p)]) for p in re.findall(r"pid=(\d+)", text)
                          if int(p) in self.workers), None)
        if found is None:
            return f"worker rank {rank}" if rank is not None else "a Ray Train worker"
        pid, info = found
        return f"worker rank {info['rank']} of {info['world']} (pid {pid} on {info['node']})"

    def failure(self, exc: BaseException) -> str:
        """Why the training ended, in one sentence: a worker's clear refusal when it had one; else the
        worker whose death looks like the cause (one that died, before one that lost its peers)."""
        if self.refusal:
            return self.refusal
        failures = getattr(exc, "worker_failures", None)  # Ray Train v2: rank -> the worker's exception
        rank, text = None, str(exc)
        if isinstance(failures, dict) and failures:
            def consequence(r: int) -> tuple[bool, bool, int]:
                what = f"{type(failures[r]).__name__} {failures[r]}"
                died = "ActorDied" in what or "died" in what or "SIGKILL" in what
                lost = any(s in what for s in ("Connection closed", "DistBackendError", "remote worker"))
                return not died, lost, r

            rank = min(failures, key=consequence)
            text = f"{type(failures[rank]).__name__}: {failures[rank]}"
        died = any(s in text for s in ("ActorDied", "died unexpectedly", "SYSTEM_ERROR", "SIGKILL", "killed"))
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
        who = self.named(rank, text)
        if died:
            return (f"{who} died ({first}); the other workers were stopped. The last finished epoch is kept: "
                    "resume the run on the cluster (--resume RUN).")
        return f"{who} failed on the cluster: {first}"


def _check_engine() -> str:
    """Why this cluster's Python cannot run the engine ('' when it can)."""
    missing = []
    for module in ("torch", "torchvision", "timm", "safetensors", "PIL", "numpy", "sklearn", "skimage"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return (f"the cluster's Python lacks {', '.join(missing)}: install the app's requirements.txt on the "
                "cluster's machines (or in its image)")
    return ""


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0] if argv else "job.json").read_text())

    def write(line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()

    say = Printer(write)
    import ray

    say({"type": "hello", "ray": ray.__version__, "run_id": spec["run_id"], "attempt": spec.get("attempt", 1),
         "python": sys.version.split()[0]})
    problem = _check_engine()
    if problem:
        say({"type": "end", "state": "failed", "reason": problem})
        return 1
    # inside a job: the cluster this job runs on. Workers' output stays in their own log files on the
    # cluster: forwarded here it would be written into this log from another thread, beside the messages
    ray.init(log_to_driver=False)
    nproc = int(spec.get("nproc") or 1)
    device = str(spec["config"].get("device") or "auto")
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        say({"type": "end", "state": "failed", "reason": f"device {device} cannot be used on a Ray cluster "
             "(cpu, cuda or auto)"})
        return 1
    if device.startswith("cuda") and gpus < nproc:
        say({"type": "end", "state": "failed", "reason": f"{nproc} workers need {nproc} GPUs; the cluster has {gpus:g}"})
        return 1
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus >= nproc)  # one GPU per worker, else CPUs
    data = str(spec["config"].get("data") or "")
    if data.startswith("/") and not Path(data).exists():  # named on the cluster (engine/cluster/stage.py)
        say({"type": "end", "state": "failed", "reason": f"the cluster cannot read the run's data at {data} "
             "(looked on the job's machine): put it there, or train on data from the app's machine"})
        return 1
    driver = Driver(spec, say)
    mailbox = _mailbox_class().remote()

    def on_term(_signum: int, _frame: Any) -> None:  # ray job stop: ask rank 0 to stop, hand over what is held
        driver.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    done = threading.Event()

    def drain() -> None:
        asked = False
        while not done.is_set():
            try:
                if driver.stopping.is_set() and not asked:
                    asked = True
                    mailbox.request_stop.remote()
                    driver.take(ray.get(mailbox.take.remote()))
                    driver.print_files()  # before the stop's grace time ends in a SIGKILL
                driver.take(ray.get(mailbox.take.remote()))
            except Exception as exc:  # the mailbox lost (its node gone): the end says what came back
                say({"type": "warning", "text": f"the relay stopped: {type(exc).__name__}"})
                return
            done.wait(DRAIN_S)

    relay = threading.Thread(target=drain, name="relay", daemon=True)
    relay.start()
    error: BaseException | None = None
    try:
        _trainer(spec, driver, mailbox, nproc, use_gpu).fit()
    except Exception as exc:  # a worker died or failed: the run ends failed, naming it
        error = exc
    done.set()
    relay.join(timeout=10)
    driver.take(ray.get(mailbox.take.remote()))  # a refusal a worker left says it better than Ray's error
    failure = driver.failure(error) if error is not None else ""
    driver.print_files()
    if driver.status:
        say({"type": "status", "status": driver.status})
    if driver.finished is not None and not failure:
        say({"type": "event", "event": driver.finished})
        say({"type": "end", "state": driver.finished.get("status", "finished"), "reason": driver.finished.get("reason", "")})
        return 0
    state = "cancelled" if driver.stopping.is_set() and not driver.refusal else "failed"
    say({"type": "end", "state": state, "reason": failure or "the job stopped before the run ended"})
    return 0 if state == "cancelled" else 1


def main_and_clean(argv: list[str]) -> int:
    """``main``, then the driver's own scratch folders removed, and the workers' copies of the run on this
    node: a worker that was killed never removed its own (engine/cluster/worker.py ``_own_copy``)."""
    import shutil

    try:
        return main(argv)
    finally:
        temp = Path(tempfile.gettempdir())
        for folder in temp.glob(f"workbench-*-{os.getpid()}"):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            spec = json.loads(Path(argv[0] if argv else "job.json").read_text())
            copies = f"workbench-{spec['run_id']}-{spec.get('attempt', 1)}-rank*"
        except (OSError, ValueError, KeyError, TypeError):
            copies = ""
        for folder in temp.glob(copies) if copies else ():
            shutil.rmtree(folder, ignore_errors=True)


def _trainer(spec: dict[str, Any], driver: Driver, mailbox: Any, nproc: int, use_gpu: bool) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.cluster.backend import torch_config
    from engine.cluster.worker import train_worker

    scratch = Path(tempfile.mkdtemp(prefix="workbench-train-", suffix=f"-{os.getpid()}"))
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "mailbox": mailbox},
        scaling_config=ScalingConfig(num_workers=nproc, use_gpu=use_gpu),
        torch_config=torch_config("nccl" if use_gpu else "gloo"),  # its store bound to the node's address
        run_config=RunConfig(name=f"workbench-{spec['run_id']}-{spec.get('attempt', 1)}", storage_path=str(scratch),
                             failure_config=FailureConfig(max_failures=0)),  # a dead worker ends the run: resume it
    )


if __name__ == "__main__":
    sys.exit(main_and_clean(sys.argv[1:]))
