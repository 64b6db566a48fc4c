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
import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import EngineError, RunError, printable
from engine.core.faults import fault_point
from engine.core.files import atomic_write_bytes, atomic_write_json, file_lock, read_json
from engine.runs.checkpoint_file import weights_meta
from engine.runs.events import EpochEnded
from engine.runs.health import run_problems
from engine.runs.metrics_file import read_rows
from engine.runs.process import owner_gone, process_start
from engine.runs.status import ACTIVE_STATES, RunStatus

if TYPE_CHECKING:
    from engine.runs.events import Event




def sweep_temps(run: "RunDir") -> None:
    """Temp files a killed writer left in a run folder, removed when that run next starts.

    Runs under the status lock: every live status writer holds it, so any temp file seen here
    belongs to a writer that died.
    """
    with file_lock(run.path / ".status.lock"):
        for tmp in run.path.glob(".*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass


def new_run_id(prefix: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tail = secrets.token_hex(2)
    return f"{stamp}-{prefix}-{tail}" if prefix else f"{stamp}-{tail}"


NEVER_STARTED_S = 120.0  # "queued" with no process this long after the last write: it never started


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

    def config_or_empty(self) -> dict[str, Any]:
        """The config, or {} when config.json is unreadable: for lists and tables, where such a run is
        shown as damaged (``problems``) instead of failing the whole list."""
        data = read_json(self.config_path, {})
        return data if isinstance(data, dict) else {}

    def status(self) -> RunStatus:
        """Status with crash detection: an active run whose process is gone reads as 'interrupted'.

        Gone means: its pid is dead, or the pid now belongs to another process (start time differs),
        or its heartbeat stopped (a process on another host, or a frozen one).
        """
        status = RunStatus.from_dict(read_json(self.status_path))
        if not status.active:
            return status
        if status.pid is None:  # no process recorded: one is spawned within moments of "queued"
            last = status.updated_at or status.created_at or 0.0
            if time.time() - last > NEVER_STARTED_S:
                return replace(status, state="interrupted",
                               reason="the run never started (its process ended before training began); start it again")
            return status
        if not status.pid_start and status.heartbeat is None:  # a live training records both with its pid
            return replace(status, state="interrupted",
                           reason="no training process can be confirmed for this run (no start time or heartbeat)")
        beat = status.heartbeat if status.heartbeat is not None else (
            status.updated_at if status.state == "running" else None)  # a running process refreshes either
        if owner_gone(status.pid, status.pid_start, beat):
            status = replace(status, state="interrupted",
                             reason="the training process ended without finishing (crash or kill); resume it")
        return status

    def metrics(self) -> list[dict[str, Any]]:
        """One row per finished epoch, each of the shape every reader expects (engine.runs.metrics_file):
        a torn line, garbage or a row lacking its numbers is skipped, never a reader's crash."""
        return read_rows(self.metrics_path)

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
        return run_problems(self)

    # writing
    def write_status(self, **fields: Any) -> None:
        """Read-modify-write under a lock: the app and the training process both write status."""
        with file_lock(self.path / ".status.lock"):
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


def create_run(runs_root: str | Path, config: dict[str, Any], run_id: str | None = None, *,
               owner: int | None = None) -> RunDir:
    """A new run folder, queued. ``owner``: the pid of the process that will train it, when that is
    the caller itself; recorded in the very first status, so a kill a moment later reads as
    interrupted, not queued."""
    root = Path(runs_root)
    if root.exists() and not root.is_dir():
        raise RunError(f"The runs folder {root.name} is a file, not a folder.")
    root.mkdir(parents=True, exist_ok=True)
    run = RunDir(root / (run_id or new_run_id()))
    run.path.mkdir(parents=False, exist_ok=False)
    atomic_write_json(run.config_path, config)
    run.write_status(state="queued", pid=owner, pid_start=process_start(owner) if owner else None, epoch=0,
                     created_at=time.time())
    return run


def open_run(runs_root: str | Path, run: str | Path) -> RunDir:
    """A run by id (under runs_root) or by path; refuses ids that escape runs_root."""
    if not str(run).strip():  # Path("") is the current folder: never a run by accident
        raise RunError("No run given: name a run id or a run folder.")
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
    """Remove a run folder, damaged or not (a damaged run must stay removable); an active run is refused.
    A link listed as a run is removed as a link: what it points to is not the runs folder's to delete."""
    if run.status().state in ACTIVE_STATES:
        raise RunError(f"Run {run.run_id} is still running; cancel it first.")
    if run.path.is_symlink():
        run.path.unlink()
        return
    shutil.rmtree(run.path)


def extend_run(run: RunDir, epochs: int) -> dict[str, Any]:
    """Set how many epochs a run trains to (before resuming it); returns the updated config."""
    config = run.config()
    config["epochs"] = int(epochs)
    atomic_write_json(run.config_path, config)
    return config


@dataclass
class RunSummary:
    """One row of a run list: what was trained, how, and how it went (a damaged run says why)."""

    run_id: str
    model: str | None
    weights: str | None
    data: str | None  # the folder's or zip's name, never a server path
    strategy: str | None
    state: str
    epochs: str  # "done/planned"
    best_val_acc: float | None
    has_best: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        return cls(**{f: data.get(f) for f in cls.__dataclass_fields__})


def describe_run(run: RunDir) -> RunSummary:
    """The run's row in a list. Any folder gets one: a value of the wrong type in a file is left out,
    and a run that cannot be read at all is listed as damaged with why (it can still be deleted)."""
    try:
        return _describe(run)
    except (EngineError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return RunSummary(run_id=run.run_id, model=None, weights=None, data=None, strategy=None, state="damaged",
                          epochs="?", best_val_acc=None, has_best=False,
                          reason=f"the run cannot be read ({printable(str(exc))[:200]})")


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _describe(run: RunDir) -> RunSummary:
    config = run.config_or_empty()
    status = run.status()
    plan = config.get("plan") if isinstance(config.get("plan"), dict) else {}
    best = run.checkpoint_meta("best") or {}
    problems = run.problems()
    if problems:
        status = replace(status, state="damaged", reason="; ".join(problems))
    epochs = config.get("epochs")
    acc = best.get("val_acc")
    data = _text_or_none(config.get("data"))
    return RunSummary(
        run_id=run.run_id,
        model=_text_or_none(config.get("model")),
        weights=_text_or_none(config.get("weights")),
        data=(Path(data).name or data) if data is not None else None,
        strategy=_text_or_none(plan.get("strategy")),
        state=status.state,
        epochs=f"{len(run.metrics())}/{epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else '?'}",
        best_val_acc=acc if isinstance(acc, (int, float)) and not isinstance(acc, bool) else None,
        has_best=run.checkpoint("best").is_file() and not problems,
        reason=status.reason if isinstance(status.reason, str) else "",
    )


def active_runs(runs_root: str | Path) -> list[RunDir]:
    return [r for r in list_runs(runs_root) if r.status().state in ACTIVE_STATES]


def usable_runs(runs_root: str | Path, kind: str = "best") -> list[RunDir]:
    """Runs with a healthy ``kind`` checkpoint: what the Evaluate/Inference pickers offer."""
    return [r for r in list_runs(runs_root) if r.checkpoint(kind).is_file() and not r.problems()]
