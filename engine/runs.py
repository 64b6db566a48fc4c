"""Run directories: everything a training leaves on disk, written so a crash never corrupts it.

runs/<run_id>/
  config.json          everything needed to reproduce the run
  metrics.jsonl        one line per epoch (append-only)
  events.jsonl         every event, for the record
  status.json          state, pid, progress; replaced atomically
  last.safetensors + last.json + last_state.pt    resume point (weights, meta, optimizer)
  best.safetensors + best.json                    best epoch by the monitored metric
  log.txt              stdout/stderr of a background run
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError
from engine.events import EpochEnded, Event

ACTIVE_STATES = ("queued", "running")


class RunError(EngineError):
    """A run cannot be found, started, resumed or read."""


# ------------------------------------------------------------------ atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sweep_stale_temps(path: Path, older_than_s: float = 120.0) -> None:
    """Temp files left by a killed writer of ``path`` (old enough not to be in flight)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def save_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors plus a JSON beside them, each written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors))
    atomic_write_json(path.with_suffix(".json"), meta)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# ------------------------------------------------------------------ run directory
def new_run_id(prefix: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tail = secrets.token_hex(2)
    return f"{stamp}-{prefix}-{tail}" if prefix else f"{stamp}-{tail}"


@dataclass
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    # files
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def cancel_path(self) -> Path:
        return self.path / "cancel"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    def checkpoint(self, kind: str) -> Path:
        return self.path / f"{kind}.safetensors"

    @property
    def train_state_path(self) -> Path:
        return self.path / "last_state.pt"

    # reading
    def config(self) -> dict[str, Any]:
        data = read_json(self.config_path)
        if not isinstance(data, dict):
            raise RunError(f"Run {self.run_id} has no readable config.json.")
        return data

    def status(self) -> dict[str, Any]:
        """Status with crash detection: 'running' whose process is gone reads as 'interrupted'."""
        data = read_json(self.status_path, {}) or {}
        state = data.get("state")
        if state in ACTIVE_STATES and data.get("pid") and not pid_alive(int(data["pid"])):
            data = {**data, "state": "interrupted",
                    "reason": "the training process ended without finishing (crash or kill); resume it"}
        return data

    def metrics(self) -> list[dict[str, Any]]:
        rows = []
        try:
            with self.metrics_path.open() as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            rows.append(json.loads(line))
                        except ValueError:
                            break  # a torn last line after a kill: ignore it
        except OSError:
            pass
        return rows

    def checkpoint_meta(self, kind: str) -> dict[str, Any] | None:
        return read_json(self.checkpoint(kind).with_suffix(".json"))

    # writing
    def write_status(self, **fields: Any) -> None:
        current = read_json(self.status_path, {}) or {}
        current.update(fields, updated_at=time.time())
        atomic_write_json(self.status_path, current)

    def append_jsonl(self, path: Path, row: dict[str, Any]) -> None:
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def record(self, event: Event) -> None:
        """The run's ``emit`` sink on disk."""
        self.append_jsonl(self.events_path, event.to_dict())
        if isinstance(event, EpochEnded):
            self.append_jsonl(self.metrics_path, event.to_dict())

    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()


def create_run(runs_root: str | Path, config: dict[str, Any], run_id: str | None = None) -> RunDir:
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    run = RunDir(root / (run_id or new_run_id()))
    run.path.mkdir(parents=False, exist_ok=False)
    atomic_write_json(run.config_path, config)
    run.write_status(state="queued", pid=None, epoch=0, created_at=time.time())
    return run


def open_run(runs_root: str | Path, run: str | Path) -> RunDir:
    """A run by id (under runs_root) or by path; refuses ids that escape runs_root."""
    candidate = Path(run)
    root = Path(runs_root).resolve()
    if not candidate.is_absolute() and len(candidate.parts) == 1:
        candidate = root / candidate
    candidate = candidate.resolve()
    if not (candidate / "config.json").is_file():
        raise RunError(f"No run at {run} (looked for {candidate / 'config.json'}).")
    return RunDir(candidate)


def list_runs(runs_root: str | Path) -> list[RunDir]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if (p / "config.json").is_file()]
    return sorted(runs, key=lambda r: r.path.name, reverse=True)


def delete_run(run: RunDir) -> None:
    if run.status().get("state") in ACTIVE_STATES:
        raise RunError(f"Run {run.run_id} is still running; cancel it first.")
    shutil.rmtree(run.path)


def extend_run(run: RunDir, epochs: int) -> dict[str, Any]:
    """Set how many epochs a run trains to (before resuming it); returns the updated config."""
    config = run.config()
    config["epochs"] = int(epochs)
    atomic_write_json(run.config_path, config)
    return config


def request_cancel(run: RunDir) -> None:
    run.cancel_path.write_text(str(time.time()))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    # a zombie (exited child not yet reaped) is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------ one training per device
class DeviceLock:
    """An exclusive flock per device under runs_root. The OS drops it when the process dies,
    so a crashed run can never leave the lock stuck."""

    def __init__(self, runs_root: str | Path, device: str):
        self.path = Path(runs_root) / f".train-{device.replace(':', '_')}.lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise RunError(f"Another training is using this device ({holder or 'unknown run'}); "
                           "wait for it or cancel it.") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "DeviceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------ background runs
def spawn_engine(args: list[str], log_path: Path) -> int:
    """``python -m engine ARGS`` in its own process session; returns the pid.

    Its own session: closing a browser tab or restarting a page never kills it; status and
    progress are read back from run directories.
    """
    project_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(project_root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", *args], cwd=project_root, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
    return proc.pid


def start_background(run: RunDir, extra_args: list[str] | None = None) -> int:
    """Train ``run`` in its own process (``python -m engine train --run-dir``); returns the pid."""
    pid = spawn_engine(["train", "--run-dir", str(run.path), *(extra_args or [])], run.log_path)
    run.write_status(state="queued", pid=pid)
    return pid


def start_group_background(runs: list[RunDir], runs_root: str | Path) -> int:
    """Train a comparison's runs one after another in one background process."""
    group = runs[0].config()["group"]
    pid = spawn_engine(["compare", "--group", group, "--out", str(runs_root)], runs[0].log_path)
    for run in runs:
        run.write_status(state="queued", pid=pid)
    return pid


def wait_for(run: RunDir, timeout_s: float = 600, poll_s: float = 0.25) -> dict[str, Any]:
    """Block until the run leaves the active states (for tests and scripts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run.status()
        if status.get("state") not in ACTIVE_STATES:
            return status
        time.sleep(poll_s)
    raise RunError(f"Run {run.run_id} did not finish within {timeout_s:.0f} s.")


def describe_run(run: RunDir) -> dict[str, Any]:
    """One row for run lists: what was trained, how, and how it went."""
    config = read_json(run.config_path, {}) or {}
    status = run.status()
    metrics = run.metrics()
    plan = config.get("plan") or {}
    best = run.checkpoint_meta("best") or {}
    return {
        "run_id": run.run_id,
        "model": config.get("model"),
        "weights": config.get("weights"),
        "data": Path(str(config.get("data", ""))).name or config.get("data"),
        "strategy": plan.get("strategy"),
        "state": status.get("state", "unknown"),
        "epochs": f"{len(metrics)}/{config.get('epochs', '?')}",
        "best_val_acc": best.get("val_acc"),
        "has_best": run.checkpoint("best").is_file(),
        "reason": status.get("reason", ""),
    }


def active_runs(runs_root: str | Path) -> list[RunDir]:
    return [r for r in list_runs(runs_root) if r.status().get("state") in ACTIVE_STATES]
