"""The app's side of a cluster run: the job's log read back into the local run folder while it runs.

The follower is an ordinary process of this machine (the command line's, or a background one the
app started) that holds the run's heartbeat, as a training process does, but never the device:
the work is on the cluster, so the machine's queue is not joined. It polls the job's log through
the dashboard, applies each new message (engine/cluster/protocol.py) through the run folder's own
recorder (events, metrics, status, TensorBoard: the curves update live), writes returned files
atomically once verified, and records how the job ended. A cancel of the run stops the job.

Attaching again (the app restarted while the job ran on) reads the log from its start and skips
the messages already applied (``applied_seq`` in status.json's ``cluster``). metrics.jsonl is
rewritten by epoch, never appended twice.
"""
from __future__ import annotations

import re
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from engine.cluster.client import TERMINAL, job_state
from engine.cluster.protocol import Reader
from engine.core.files import atomic_write_bytes
from engine.runs.events import (
    CheckpointSaved,
    EpochEnded,
    PlanChosen,
    RunFinished,
    RunStarted,
    StepLogged,
    no_emit,
)
from engine.runs.recorder import RunRecorder
from engine.runs.store import RunDir

if TYPE_CHECKING:
    from engine.runs.events import Emit, Event

EVENTS = {cls.__name__: cls for cls in (RunStarted, PlanChosen, StepLogged, EpochEnded, CheckpointSaved,
                                        RunFinished)}
NOT_ACCEPTED = {"status.json", "events.jsonl", "metrics.jsonl", "log.txt", "cancel", "config.json"}
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")
POLL_S = 0.5  # how often a cancel of the run is looked for while the job runs


def event_of(data: Any) -> Event | None:
    """An engine event from its dict (unknown fields dropped: a job of a newer engine still reads)."""
    if not isinstance(data, dict):
        return None
    cls = EVENTS.get(str(data.get("event")))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError:
        return None


class Mirror(RunDir):
    """The local run folder as the recorder writes it for a cluster run: an epoch's metrics line
    replaces any line of that epoch or later (a replayed log, a resume after a lost epoch)."""

    def record(self, event: Event) -> None:
        self.append_jsonl(self.events_path, event.to_dict())
        if isinstance(event, EpochEnded):
            rows = [r for r in self.metrics() if r.get("epoch", 0) < event.epoch]
            self.rewrite_metrics([*rows, event.to_dict()])


class Follower:
    def __init__(self, run: RunDir, client: Any, job_id: str, address: str, emit: Emit = no_emit,
                 applied: int = -1):
        self.run, self.client, self.job_id, self.address = run, client, job_id, address
        self.recorder = RunRecorder(Mirror(run.path), emit)
        self.reader = Reader(applied=applied)
        self.end: dict[str, Any] | None = None
        self.finished = False
        self.asked_stop = False
        self.damaged: list[str] = []

    def apply(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            event = event_of(message.get("event"))
            if event is None:
                return
            if isinstance(event, RunStarted):
                event.device = f"{event.device}, on the Ray cluster {self.address}"
            if isinstance(event, CheckpointSaved):
                event.path = str(self.run.checkpoint(event.kind))
            self.recorder(event)
            self.finished = self.finished or isinstance(event, RunFinished)
        elif kind == "file":
            name = str(message.get("name"))
            if SAFE_NAME.fullmatch(name) and name not in NOT_ACCEPTED:
                atomic_write_bytes(self.run.path / name, message["data"])
        elif kind == "damaged":
            self.damaged.append(str(message.get("name")))
        elif kind == "status" and isinstance(message.get("status"), dict):
            self.run.write_status(**message["status"])
        elif kind == "hello":
            self.run.write_status(reason=f"on the Ray cluster {self.address} (Ray {message.get('ray')}), "
                                         f"job {self.job_id}")
        elif kind == "end":
            self.end = message

    def feed(self, text: str) -> None:
        """Apply the messages of the next piece of the job's log (any cut, in order)."""
        before = self.reader.applied
        for message in self.reader.feed(text):
            self.apply(message)
        if self.reader.applied != before:
            self._remember()

    def _remember(self) -> None:
        from engine.core.files import read_json

        current = read_json(self.run.status_path, {}) or {}
        cluster = dict(current.get("cluster") or {}) if isinstance(current, dict) else {}
        cluster["applied_seq"] = self.reader.applied
        self.run.write_status(cluster=cluster)

    def _stop_job(self) -> None:
        try:
            self.client.stop_job(self.job_id)
        except Exception:  # the job already ended: its log says how
            pass

    async def _watch_cancel(self, poll_s: float) -> None:
        """A cancel of the run (its cancel file) stops the job, however quiet its log is meanwhile."""
        import asyncio

        while True:
            if not self.asked_stop and self.run.cancel_requested():
                self.asked_stop = True
                await asyncio.to_thread(self._stop_job)
            await asyncio.sleep(poll_s)

    async def _tail(self, poll_s: float) -> None:
        """The job's log as the dashboard streams it (a websocket: each line once, about a second after
        it is written), until the job has ended and its last line is sent."""
        import asyncio

        watcher = asyncio.create_task(self._watch_cancel(poll_s))
        try:
            async for text in self.client.tail_job_logs(self.job_id):
                self.feed(text)
        finally:
            watcher.cancel()

    def follow(self, poll_s: float = POLL_S) -> str:
        """Until the job ends and its log is read; returns the run's final state.

        Streamed, not polled: ``get_job_logs`` sends the whole log on every call, so polling it each
        second re-read the returned weights (base64) once a second at the end of a run. A broken stream
        (the cluster unreachable, a proxy that drops the websocket) is said in the status and opened
        again after a pause; a new stream starts at the log's first line, and ``seq`` skips what was
        applied."""
        import asyncio

        from engine.runs.process import Heartbeat

        errors = 0
        with Heartbeat(self.run.write_status):
            while True:
                try:
                    asyncio.run(self._tail(poll_s))
                    state, message = job_state(self.client, self.job_id)
                except Exception as exc:  # the cluster did not answer: the job trains on; try again
                    errors += 1
                    if errors == 1 or errors % 60 == 0:
                        self.run.write_status(reason=f"the Ray cluster {self.address} does not answer "
                                                     f"({type(exc).__name__}); still trying")
                    self.reader.restart()  # a line cut by the broken stream is not continued by the next
                    time.sleep(min(30.0, poll_s * 2 ** min(errors, 5)))
                    continue
                errors = 0
                if state in TERMINAL:
                    return self._ended(state, message, self.asked_stop)
                self.reader.restart()  # the stream closed before the job ended: open it again

    def _ended(self, state: str, message: str, asked_stop: bool) -> str:
        """Record how the job ended when the run's own RunFinished did not say it."""
        damaged = f"; {len(self.damaged)} returned file(s) were damaged in the log and not written" \
            if self.damaged else ""
        if self.finished:  # the run's own RunFinished was applied: its state and reason stand
            from engine.core.files import read_json
            from engine.runs.status import RunStatus

            recorded = RunStatus.from_dict(read_json(self.run.status_path, {}))
            if damaged:
                self.run.write_status(reason=f"{recorded.reason}{damaged}")
            return recorded.state
        if self.end is not None:
            final, reason = str(self.end.get("state") or "failed"), str(self.end.get("reason") or "")
        elif asked_stop:
            final, reason = "cancelled", "cancelled: the cluster job was stopped"
        else:
            final = "failed"
            reason = (f"the cluster job {self.job_id} ended ({state}) without a result: {message[:200]}; "
                      "the last epoch that came back is kept")
        self.run.write_status(state=final, reason=reason + damaged, finished_at=time.time())
        return final
