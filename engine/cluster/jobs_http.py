"""Ray's job API spoken over plain HTTP: the calls a cluster run makes of ``JobSubmissionClient``
(submit with its working_dir, status, stop, the log streamed), without Ray on the app's machine.

Why: the app that sends runs to a cluster is the shared one, on Streamlit Community Cloud, where
``ray[default]`` (240 MB installed, with its dependencies) does not fit the budget of the app's
``requirements.txt``. The dashboard's job API is HTTP and JSON (``/api/jobs/``, ``/api/packages/``,
a websocket for the log's tail), so this machine needs only the standard library and ``websockets``
(which Streamlit itself depends on). The same routes and bodies as Ray's own SDK
(``ray/dashboard/modules/job/sdk.py``, ``dashboard_sdk.py``): a working_dir is zipped here, uploaded
once under a content-named ``gcs://_ray_pkg_<sha1>.zip`` and named by that URI in the job's runtime
environment.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

TIMEOUT_S = 60  # one request (an upload of up to a few hundred MB included)


class JobApiError(RuntimeError):
    """The dashboard answered with an error (its text kept, as Ray's SDK raises it)."""


class HttpJobClient:
    """The subset of ``ray.job_submission.JobSubmissionClient`` that engine/cluster uses."""

    def __init__(self, address: str):
        self.address = address.rstrip("/")

    def _request(self, method: str, path: str, *, data: bytes | None = None, json_data: Any = None,
                 ok: tuple[int, ...] = (200,)) -> tuple[int, bytes]:
        headers = {}
        if json_data is not None:
            data, headers = json.dumps(json_data).encode(), {"Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.address}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:  # noqa: S310 - the cluster's http(s)
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in ok:
                return exc.code, body
            raise JobApiError(f"Request failed with status code {exc.code}: "
                              f"{body.decode(errors='replace')[:500]}") from None

    # ------------------------------------------------------------------ the job
    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
                   metadata: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None) -> str:
        env = dict(runtime_env)
        excludes = list(env.pop("excludes", None) or [])
        folder = env.get("working_dir")
        if isinstance(folder, str) and Path(folder).is_dir():
            env["working_dir"] = self.upload_folder(Path(folder), excludes)
        body = {"entrypoint": entrypoint, "submission_id": submission_id, "runtime_env": env,
                "metadata": metadata or {}}
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        _, reply = self._request("POST", "/api/jobs/", json_data=body)
        return str(json.loads(reply).get("submission_id") or submission_id)

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        _, reply = self._request("GET", f"/api/jobs/{job_id}")
        info = json.loads(reply)
        return SimpleNamespace(status=str(info.get("status", "")), message=info.get("message") or "")

    def stop_job(self, job_id: str) -> bool:
        _, reply = self._request("POST", f"/api/jobs/{job_id}/stop")
        return bool(json.loads(reply).get("stopped"))

    def get_job_logs(self, job_id: str) -> str:
        _, reply = self._request("GET", f"/api/jobs/{job_id}/logs")
        return str(json.loads(reply).get("logs", ""))

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """The log's lines as the dashboard streams them (its websocket), until it closes the stream at
        the job's end; a stream cut otherwise raises (the follower opens a new one)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosedOK

        url = "ws" + self.address[len("http"):] + f"/api/jobs/{job_id}/logs/tail"
        # no permessage-deflate: offered it, Ray 2.60's dashboard (aiohttp) sent no line of the log and closed
        # the stream at once (1000), a finished job's too; uncompressed, every line arrives as Ray's SDK gets it
        async with connect(url, max_size=None, open_timeout=TIMEOUT_S, compression=None) as socket:
            try:
                async for message in socket:
                    yield message if isinstance(message, str) else message.decode(errors="replace")
            except ConnectionClosedOK:
                return

    # ------------------------------------------------------------------ the working_dir
    def upload_folder(self, folder: Path, excludes: list[str]) -> str:
        """``folder`` zipped (its contents at the top, ``excludes`` left out) and uploaded unless the cluster
        has that content already; returns the package's URI."""
        data = zip_folder(folder, excludes)
        name = f"_ray_pkg_{hashlib.sha1(data).hexdigest()[:32]}.zip"
        status, _ = self._request("GET", f"/api/packages/gcs/{name}", ok=(200, 404))
        if status == 404:
            self._request("PUT", f"/api/packages/gcs/{name}", data=data)
        return f"gcs://{name}"


def zip_folder(folder: Path, excludes: list[str]) -> bytes:
    """The folder's files in a zip, paths relative to it, sorted; a name or path matching one of
    ``excludes`` (fnmatch patterns, as Ray's runtime_env excludes) is left out, with what is below it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(folder):
            here = Path(root).relative_to(folder)
            dirs[:] = sorted(d for d in dirs if not _excluded(here / d, excludes))
            for name in sorted(files):
                path = here / name
                if not _excluded(path, excludes) and not (Path(root) / name).is_symlink():
                    zf.write(Path(root) / name, path.as_posix())
    return buffer.getvalue()


def _excluded(path: Path, patterns: list[str]) -> bool:
    text = path.as_posix()
    return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(text, p) for p in patterns)
