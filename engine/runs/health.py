"""Why a run folder cannot be used: cheap checks of its files, cached by file stamps.

One damaged run is listed as damaged with the reason; it never breaks the others.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from engine.core.errors import EngineError, RunError
from engine.core.files import read_json
from engine.runs.checkpoint_file import file_keys_digest, head_classes, weights_finite, weights_meta


class RunFiles(Protocol):
    """The files of a run folder these checks read (a RunDir)."""

    path: Path
    config_path: Path
    status_path: Path
    train_state_path: Path

    def checkpoint(self, kind: str) -> Path: ...

    def status(self) -> dict[str, Any]: ...


_health_cache: dict[tuple, list[str]] = {}


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (None, None)


def run_problems(run: RunFiles) -> list[str]:
    files = [run.config_path, run.checkpoint("best"), run.checkpoint("best").with_suffix(".json"),
             run.train_state_path, run.status_path]
    key = (str(run.path), *(_stamp(f) for f in files))
    if key not in _health_cache:
        _health_cache[key] = _check_run(run)
    return list(_health_cache[key])


def _check_run(run: RunFiles) -> list[str]:
    problems: list[str] = []
    config = read_json(run.config_path)
    if not isinstance(config, dict):
        problems.append("config.json is missing or not valid JSON")
    else:
        from engine.config import TrainConfig

        try:
            TrainConfig.from_dict(config).validate()
        except EngineError as exc:
            problems.append(f"config.json is invalid: {exc}")
    best = run.checkpoint("best")
    if not best.exists() and run.train_state_path.is_file() and run.status().state == "finished":
        problems.append("best.safetensors is missing although the run finished")  # a kill is repaired on resume
    if best.exists() and not best.is_file():
        problems.append("best.safetensors is not a file")
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
        if isinstance(meta, dict) and meta.get("state_keys") and meta["state_keys"] != file_keys_digest(best):
            problems.append("best.safetensors holds the weights of another model")
        elif isinstance(meta, dict) and isinstance(meta.get("spec"), dict) and isinstance(meta.get("class_names"), list):
            found = head_classes(best, str(meta["spec"].get("head", "")))
            if found is not None and found != len(meta["class_names"]):
                problems.append(f"best.safetensors holds the weights of another model (its head predicts {found} "
                                f"classes, the run has {len(meta['class_names'])})")
        if not problems and not weights_finite(best):
            problems.append("best.safetensors holds NaN or infinite weights")
    return problems
