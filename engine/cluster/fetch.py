"""Data named by URL, fetched by the cluster job that trains on it (never by the app's server).

A dataset too big to travel with a job (engine/cluster/stage.py) can be named by where the cluster's
machines read it: a path there, or an http(s) URL of a zip (object storage, a file server inside the
team's network). The job downloads it before training, into its own folder on each worker's node, and
the engine's zip reader takes it from there (engine/data/archive.py: member paths, sizes and the
number of files checked before anything is extracted). Downloads are bounded: ``fetch_limit()`` bytes
(WORKBENCH_CLUSTER_FETCH_MB, checked against Content-Length before reading and counted while reading)
and ``TIMEOUT_S`` without a byte. What fails is said in one line, naming the URL.

The app's own server never fetches a URL: on a shared app that would let anyone make the server read
addresses inside its network. A run whose data is a URL trains on a cluster only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from engine.core.errors import DataError

FETCH_LIMIT_MB = 4096  # default; WORKBENCH_CLUSTER_FETCH_MB changes it
TIMEOUT_S = 60
CHUNK = 1 << 20
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first bytes (an empty zip: the end record)


def is_url(source: object) -> bool:
    return isinstance(source, str) and "://" in source


def fetch_limit() -> int:
    try:
        return int(float(os.environ.get("WORKBENCH_CLUSTER_FETCH_MB", FETCH_LIMIT_MB)) * 1024 * 1024)
    except ValueError:
        return FETCH_LIMIT_MB * 1024 * 1024


def shown(url: str) -> str:
    """The URL as said in a message: no credentials, at most 100 characters."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    text = f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    return text if len(text) <= 100 else text[:97] + "..."


def check_url(url: str) -> None:
    """Refused before anything is submitted: only http(s) URLs of a zip are fetched."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DataError(f"Data by URL is fetched over http(s) only (got {shown(url)}): name an http(s) URL of a "
                        "zip, or a path the cluster's machines read.")


def fetch_dataset(url: str, folder: Path, limit: int | None = None) -> Path:
    """Download the zip at ``url`` into ``folder`` (created) and return its path."""
    import urllib.error
    import urllib.request

    check_url(url)
    limit = fetch_limit() if limit is None else limit
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urlsplit(url).path).name or "data")[:80].lstrip(".") or "data"
    target = folder / (name if name.lower().endswith(".zip") else f"{name}.zip")
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) checked above
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise DataError(f"The data at {shown(url)} is {int(length) / 1e6:.0f} MB, over the "
                                f"{limit / 1e6:.0f} MB a cluster job fetches (WORKBENCH_CLUSTER_FETCH_MB).")
            read = 0
            with partial.open("wb") as out:
                while chunk := response.read(CHUNK):
                    read += len(chunk)
                    if read > limit:
                        raise DataError(f"The data at {shown(url)} is over the {limit / 1e6:.0f} MB a cluster job "
                                        "fetches (WORKBENCH_CLUSTER_FETCH_MB).")
                    out.write(chunk)
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"The cluster could not fetch the data at {shown(url)}: HTTP {exc.code} {exc.reason}.") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"The cluster could not fetch the data at {shown(url)} ({reason}).") from None
    except DataError:
        partial.unlink(missing_ok=True)
        raise
    with partial.open("rb") as data:
        head = data.read(4)
    if head not in ZIP_MAGIC:
        partial.unlink(missing_ok=True)
        raise DataError(f"The data at {shown(url)} is not a zip: name the URL of a .zip of a folder with one "
                        "sub-folder per class (or a layout the data page lists).")
    partial.replace(target)
    return target
