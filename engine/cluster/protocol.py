"""The return channel of a cluster run: lines in the Ray job's log (the dashboard port is all the app needs).

The job's driver (engine/cluster/job.py) is the only writer: Ray Train workers hand it what they have
(events, finished files) through a small actor, and it prints them here, one message a line::

    @@wb <seq> <crc32 of payload, hex> <payload: compact JSON>

``seq`` counts from 0 in each job, so a reader that attaches again (an app restarted) replays the log
and skips what it applied; the CRC makes a line that was cut or interleaved with other output
detectable (it is then ignored and the gap is reported). Anything else in the log (Ray's own lines,
a worker's warnings) is not a message and is ignored.

Messages (``type``):

- ``hello``: the job started (its Ray version, the job's run id, attempt);
- ``event``: an engine event (engine/runs/events.py) as its dict;
- ``file`` + ``chunk``...: a file of the run folder, ``size`` bytes with ``sha256``, sent as
  ``chunks`` base64 pieces; written locally only when every piece arrived and the digest matches;
- ``status``: fields of the remote status.json the local one lacks (split, test, calibration);
- ``end``: how the job ended (state, reason), after every file it had was printed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

PREFIX = "@@wb "
CHUNK_BYTES = 48 * 1024  # raw bytes per chunk line (64 KiB of base64): far below any log line limit


def encode(seq: int, message: dict[str, Any]) -> str:
    payload = json.dumps(message, separators=(",", ":"))
    return f"{PREFIX}{seq} {zlib.crc32(payload.encode()):08x} {payload}"


def decode(line: str) -> tuple[int, dict[str, Any]] | None:
    """The message of one log line; None when it is not one (or damaged)."""
    if not line.startswith(PREFIX):
        return None
    try:
        seq_text, crc, payload = line[len(PREFIX):].rstrip("\r\n").split(" ", 2)
        if f"{zlib.crc32(payload.encode()):08x}" != crc:
            return None
        message = json.loads(payload)
        return (int(seq_text), message) if isinstance(message, dict) else None
    except ValueError:
        return None


def file_messages(name: str, data: bytes) -> Iterator[dict[str, Any]]:
    """A file as one ``file`` header and its ``chunk`` messages."""
    pieces = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    yield {"type": "file", "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
           "chunks": len(pieces)}
    for i, piece in enumerate(pieces):
        yield {"type": "chunk", "name": name, "i": i, "b64": base64.b64encode(piece).decode()}


class Printer:
    """Numbers messages and prints them, one whole line per write (the driver's log is shared with
    Ray's own output, written from other threads)."""

    def __init__(self, write: Any):
        import threading

        self.write, self.seq, self._lock = write, 0, threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.write(encode(self.seq, message) + "\n")
            self.seq += 1

    def file(self, name: str, data: bytes) -> None:
        for message in file_messages(name, data):
            self(message)


@dataclass
class _Partial:
    size: int
    sha256: str
    chunks: int
    pieces: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Reader:
    """Reads a job's log incrementally (``feed`` any piece of text, in order) and yields whole messages.

    Files come out as ``{"type": "file", "name", "data": bytes}`` once complete and verified; a file
    whose digest does not match is reported as ``{"type": "damaged", ...}`` (never written)."""

    applied: int = -1  # the last seq handed out: a replayed log skips up to here
    gaps: int = 0  # lines lost or damaged (seen as a jump in seq)
    _tail: str = ""
    _last_seen: int = -1
    _files: dict[str, _Partial] = field(default_factory=dict)

    def feed(self, text: str) -> list[dict[str, Any]]:
        text, self._tail = self._tail + text, ""
        lines = text.split("\n")
        self._tail = lines.pop()  # a line still being written
        return list(self._messages(lines))

    def restart(self) -> None:
        """The log is read again from its start (a new stream): a line left unfinished is dropped, the
        messages already seen are skipped by their ``seq``."""
        self._tail = ""

    def _messages(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
        for line in lines:
            decoded = decode(line)
            if decoded is None:
                continue
            seq, message = decoded
            if seq <= self._last_seen:
                continue
            if seq != self._last_seen + 1:
                self.gaps += seq - self._last_seen - 1
            self._last_seen = seq
            out = self._assemble(message)
            if out is not None and seq > self.applied:
                self.applied = seq
                yield out

    def _assemble(self, message: dict[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        if kind == "file":
            self._files[message["name"]] = _Partial(int(message["size"]), str(message["sha256"]), int(message["chunks"]))
            return None
        if kind != "chunk":
            return message
        partial = self._files.get(message.get("name", ""))
        if partial is None:
            return None
        partial.pieces[int(message["i"])] = base64.b64decode(message["b64"])
        if len(partial.pieces) < partial.chunks:
            return None
        name = message["name"]
        del self._files[name]
        data = b"".join(partial.pieces[i] for i in range(partial.chunks) if i in partial.pieces)
        if len(data) != partial.size or hashlib.sha256(data).hexdigest() != partial.sha256:
            return {"type": "damaged", "name": name}
        return {"type": "file", "name": name, "data": data}
