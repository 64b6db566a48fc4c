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
from engine.faults import fault_point

ACTIVE_STATES = ("queued", "running")


class RunError(EngineError):
    """A run cannot be found, started, resumed or read."""


# ------------------------------------------------------------------ atomic files
HEARTBEAT_S = 5.0  # a training process refreshes status.json at least this often
HEARTBEAT_STALE_S = 90.0  # no heartbeat for this long: the process is gone (another host, pid reused)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    A reader (or a crash) sees the old file or the new one, never a mix. A failed write (full
    disk) removes its temp file and leaves the old target as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    fault_point(path.name, "before")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            fh.flush()
            fault_point(path.name, "mid")
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(path.name, "before-rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fault_point(path.name, "after")


def _sweep_stale_temps(path: Path, older_than_s: float = 120.0) -> None:
    """Temp files left by a killed writer of ``path`` (old enough not to be in flight)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def sweep_temps(run: "RunDir") -> None:
    """Temp files a killed writer left in a run folder, removed when that run next starts.

    Runs under the status lock: every live status writer holds it, so any temp file seen here
    belongs to a writer that died.
    """
    with _locked(run.path / ".status.lock"):
        for tmp in run.path.glob(".*.tmp"):
            try:
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


META_KEY = "workbench_meta"  # the JSON meta inside the safetensors header: weights and meta are one file


def save_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors with the meta in its header, plus a JSON copy beside it for people.

    One atomic file carries both, so a kill between two writes can never pair weights of one
    epoch with the meta (classes, epoch, preprocessing) of another.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {**meta, "state_keys": keys_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)


def keys_digest(names) -> str:
    """A short fingerprint of a state dict's parameter names: tells another model's weights apart."""
    import hashlib

    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:16]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
        raise RunError(f"{path.parent.name}/{path.name} is damaged or not a safetensors file ({exc}).") from exc


def weights_meta(path: Path) -> dict[str, Any] | None:
    """The meta inside a weights file's header (None when absent); raises RunError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:
        raise RunError(f"{path.name} is damaged ({exc}).") from exc
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise RunError(f"{path.name} carries unreadable meta.") from exc
    return meta if isinstance(meta, dict) else None


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
        """Status with crash detection: an active run whose process is gone reads as 'interrupted'.

        Gone means: its pid is dead, or the pid now belongs to another process (start time differs),
        or its heartbeat stopped (a process on another host, or a frozen one).
        """
        data = read_json(self.status_path, {}) or {}
        if not isinstance(data, dict):
            data = {}
        if data.get("state") in ACTIVE_STATES and _owner_gone(data):
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
                            row = json.loads(line)
                        except ValueError:
                            continue  # a torn line after a kill, or garbage: that line only
                        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                            rows.append(row)
        except OSError:
            pass
        return rows

    def checkpoint_meta(self, kind: str) -> dict[str, Any] | None:
        """The checkpoint's meta: from inside the weights file (the truth), else the JSON beside it."""
        path = self.checkpoint(kind)
        if path.is_file():
            try:
                meta = weights_meta(path)
            except RunError:
                return None
            if meta is not None:
                return meta
        meta = read_json(path.with_suffix(".json"))
        return meta if isinstance(meta, dict) else None

    def problems(self) -> list[str]:
        """Why this run folder cannot be used (empty: healthy). Cheap checks, cached by file stamps."""
        return _run_problems(self)

    # writing
    def write_status(self, **fields: Any) -> None:
        """Read-modify-write under a lock: the app and the training process both write status."""
        with _locked(self.path / ".status.lock"):
            current = read_json(self.status_path, {}) or {}
            if not isinstance(current, dict):
                current = {}
            current.update(fields, updated_at=time.time())
            atomic_write_json(self.status_path, current)

    def append_jsonl(self, path: Path, row: dict[str, Any]) -> None:
        line = (json.dumps(row) + "\n").encode()
        with path.open("ab") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            fault_point(path.name, "mid")
            fh.write(line[len(line) // 2:])
            fh.flush()

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with exactly these rows (a resume makes the file match its checkpoint)."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def record(self, event: Event) -> None:
        """The run's ``emit`` sink on disk."""
        self.append_jsonl(self.events_path, event.to_dict())
        if isinstance(event, EpochEnded):
            self.append_jsonl(self.metrics_path, event.to_dict())

    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()


def create_run(runs_root: str | Path, config: dict[str, Any], run_id: str | None = None) -> RunDir:
    root = Path(runs_root)
    if root.exists() and not root.is_dir():
        raise RunError(f"The runs folder {root.name} is a file, not a folder.")
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


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_gone(status: dict[str, Any]) -> bool:
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # queued, process not started yet
    if not pid_alive(pid):
        return True
    started = status.get("pid_start")
    if started and process_start(pid) not in (None, started):
        return True
    beat = status.get("heartbeat")
    return isinstance(beat, (int, float)) and time.time() - beat > HEARTBEAT_STALE_S


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
    """One training per device on this machine: an exclusive flock in the machine-wide lock folder
    (``paths.lock_dir()``), whatever runs folder a training writes to. The OS drops a flock when
    its process dies, so a crashed holder's lock is simply taken over by the next training."""

    def __init__(self, lock_dir: str | Path | None, device: str, holder: str = ""):
        from engine.paths import lock_dir as default_lock_dir

        self.path = Path(lock_dir or default_lock_dir()) / f"train-{device.replace(':', '_')}.lock"
        self.holder = holder
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
        fh.write(f"{self.holder + ', ' if self.holder else ''}pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def is_free(self) -> bool:
        """A probe: could a training start now? (Takes and drops the lock at once.)"""
        try:
            self.acquire()
        except RunError:
            return False
        self.release()
        return True

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
    run.write_status(state="queued", pid=None, reason="")  # recorded before the process exists
    pid = spawn_engine(["train", "--run-dir", str(run.path), *(extra_args or [])], run.log_path)
    run.write_status(pid=pid, pid_start=process_start(pid))
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
    """One row for run lists: what was trained, how, and how it went (damaged runs say why)."""
    config = read_json(run.config_path, {})
    config = config if isinstance(config, dict) else {}
    status = run.status()
    metrics = run.metrics()
    plan = config.get("plan") if isinstance(config.get("plan"), dict) else {}
    best = run.checkpoint_meta("best") or {}
    problems = run.problems()
    if problems:
        status = {**status, "state": "damaged", "reason": "; ".join(problems)}
    return {
        "run_id": run.run_id,
        "model": config.get("model"),
        "weights": config.get("weights"),
        "data": Path(str(config.get("data", ""))).name or config.get("data"),
        "strategy": plan.get("strategy"),
        "state": status.get("state", "unknown"),
        "epochs": f"{len(metrics)}/{config.get('epochs', '?')}",
        "best_val_acc": best.get("val_acc"),
        "has_best": run.checkpoint("best").is_file() and not problems,
        "reason": status.get("reason", ""),
    }


def active_runs(runs_root: str | Path) -> list[RunDir]:
    return [r for r in list_runs(runs_root) if r.status().get("state") in ACTIVE_STATES]


def usable_runs(runs_root: str | Path, kind: str = "best") -> list[RunDir]:
    """Runs with a healthy ``kind`` checkpoint: what the Evaluate/Inference pickers offer."""
    return [r for r in list_runs(runs_root) if r.checkpoint(kind).is_file() and not r.problems()]


# ------------------------------------------------------------------ health of a run folder
_health_cache: dict[tuple, list[str]] = {}


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (None, None)


def _run_problems(run: RunDir) -> list[str]:
    files = [run.config_path, run.checkpoint("best"), run.checkpoint("best").with_suffix(".json"),
             run.train_state_path, run.status_path]
    key = (str(run.path), *(_stamp(f) for f in files))
    if key not in _health_cache:
        _health_cache[key] = _check_run(run)
    return list(_health_cache[key])


def _check_run(run: RunDir) -> list[str]:
    problems: list[str] = []
    config = read_json(run.config_path)
    if not isinstance(config, dict):
        problems.append("config.json is missing or not valid JSON")
    else:
        from engine.train import TrainConfig

        try:
            TrainConfig.from_dict(config).validate()
        except EngineError as exc:
            problems.append(f"config.json is invalid: {exc}")
    best = run.checkpoint("best")
    if not best.exists() and run.train_state_path.is_file() and run.status().get("state") == "finished":
        problems.append("best.safetensors is missing although the run finished")  # a kill is repaired on resume
    if best.is_file():
        try:
            meta = weights_meta(best)
        except RunError:
            problems.append("best.safetensors is truncated or not a safetensors file")
            return problems
        sidecar = best.with_suffix(".json")
        if meta is None:  # written before the meta moved into the weights file
            meta = read_json(sidecar)
            if not isinstance(meta, dict):
                problems.append("best.json is missing or not valid JSON")
        elif sidecar.exists() and not isinstance(read_json(sidecar), dict):
            problems.append("best.json is not valid JSON")
        if isinstance(meta, dict) and not (isinstance(meta.get("spec"), dict) and meta.get("class_names")):
            problems.append("best checkpoint meta lacks the model spec or class names")
        if isinstance(meta, dict) and meta.get("state_keys") and meta["state_keys"] != _file_keys_digest(best):
            problems.append("best.safetensors holds the weights of another model")
        if not problems and not _weights_finite(best):
            problems.append("best.safetensors holds NaN or infinite weights")
    return problems


def _file_keys_digest(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return keys_digest(fh.keys())
    except Exception:
        return None


def _weights_finite(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return False
    except Exception:
        return False
    return True


# ------------------------------------------------------------------ cross-process file lock
class _locked:
    """``with _locked(path):`` an exclusive flock on a small lock file (blocking, short holds only)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()


# ------------------------------------------------------------------ heartbeat
class Heartbeat:
    """Refreshes status.json's heartbeat from a daemon thread while a run trains.

    Readers (any process) treat a run as interrupted once the beat is older than HEARTBEAT_STALE_S,
    even where they cannot see its pid.
    """

    def __init__(self, run: RunDir, every_s: float = HEARTBEAT_S):
        import threading

        self.run, self.every_s = run, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.run.write_status(heartbeat=time.time())
            except OSError:
                pass  # a full disk must not kill the training from this thread

    def __enter__(self) -> "Heartbeat":
        self.run.write_status(heartbeat=time.time(), pid=os.getpid(), pid_start=process_start(os.getpid()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
