"""The cluster from the app's side: its address, reached and checked before anything is written, and
the few calls of Ray's job API a cluster run makes (submit, status, logs, stop).

Only the dashboard's HTTP port (8265) is used: the job API, and through it the job's log, which is
the run's return channel (engine/cluster/protocol.py). This machine speaks it over plain HTTP
(engine/cluster/jobs_http.py): Ray runs on the cluster only, never on the app's server.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from engine.core.errors import EngineError, printable

ENV = "WORKBENCH_CLUSTER"
MIN_RAY = (2, 9)  # ray.train.get_context, ScalingConfig and RunConfig under ray.train, job submission ids
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(EngineError):
    """The cluster cannot take or give back a run (unreachable, too old, refused the job)."""


def cluster_address(given: str | None) -> str | None:
    """``--cluster`` or WORKBENCH_CLUSTER, as the dashboard's URL (http:// added when missing); None: train here."""
    text = (given if given is not None else os.environ.get(ENV, "")).strip()
    if not text:
        return None
    if "://" not in text:
        text = "http://" + text
    return text.rstrip("/")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_cluster(address: str, timeout_s: float = 5.0) -> str:
    """The cluster's Ray version, or one line saying why it cannot take a run (before anything is written)."""
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout_s) as reply:
            info = json.loads(reply.read(64 * 1024) or b"{}")
    except urllib.error.HTTPError as exc:
        raise ClusterError(f"{address} answered HTTP {exc.code}: it is not a Ray dashboard (the cluster's "
                           "address is its dashboard, http://HOST:8265).") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClusterError(f"The Ray cluster at {address} cannot be reached ({printable(str(reason))[:120]}); "
                           "is it running, and its dashboard port (8265) open to this machine?") from None
    except ValueError:
        raise ClusterError(f"{address} does not answer as a Ray dashboard does (no version).") from None
    version = str(info.get("ray_version") or "") if isinstance(info, dict) else ""
    if not version:
        raise ClusterError(f"{address} does not say its Ray version: it is not a Ray dashboard, or a Ray too "
                           "old for job submission.")
    if _version_tuple(version) < MIN_RAY:
        raise ClusterError(f"The Ray cluster at {address} runs Ray {printable(version)[:20]}; cluster runs need "
                           f"Ray {'.'.join(map(str, MIN_RAY))} or newer.")
    return version


def connect(address: str) -> Any:
    """The job API of the cluster at ``address`` (checked first: ``check_cluster``), over plain HTTP:
    Ray is not needed on this machine (engine/cluster/jobs_http.py)."""
    from engine.cluster.jobs_http import HttpJobClient

    return HttpJobClient(address)


def job_env() -> dict[str, str]:
    """Environment of the job's processes on the cluster (a test's fault point travels with it)."""
    env = {
        "PYTHONUNBUFFERED": "1",  # the log is the return channel: every line as soon as it is printed
        "RAY_CHDIR_TO_TRIAL_DIR": "0",  # workers stay in the working_dir (Ray Train v1 moves them otherwise)
        # a stop (cancel) is SIGTERM, then SIGKILL after this long: time for the driver to print what it holds
        # and for rank 0 to stop at its next step and say so (Ray's default is 3 s)
        "RAY_JOB_STOP_WAIT_TIME_S": "30",
    }
    if os.environ.get("WORKBENCH_FAULT"):  # engine/core/faults.py: kill a worker at a named step
        env["WORKBENCH_FAULT"] = os.environ["WORKBENCH_FAULT"]
    return env


def submit(client: Any, stage: str, submission_id: str, metadata: dict[str, str]) -> str:
    """Submit the staged job (engine/cluster/stage.py); returns its id (the ``submission_id``)."""
    try:
        return client.submit_job(
            entrypoint="python -m engine.cluster.job job.json",
            submission_id=submission_id,
            runtime_env={"working_dir": stage, "env_vars": job_env(),
                         "excludes": ["__pycache__", "*.pyc"]},
            metadata=metadata,
            entrypoint_num_cpus=0,  # the driver only relays: the workers hold the CPUs/GPUs
        )
    except Exception as exc:  # RuntimeError with the dashboard's reply, a package too large, a lost connection
        raise ClusterError(f"The cluster refused the job: {printable(str(exc)).splitlines()[0][:300]}") from None


def job_state(client: Any, job_id: str) -> tuple[str, str]:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""
    info = client.get_job_info(job_id)
    status = getattr(info.status, "value", str(info.status))
    return str(status), str(info.message or "")
