"""Cluster runs (engine/cluster/, docs/cluster.md).

The first part needs no Ray: the log protocol, the data plan, the address and the refusals said in
one line before anything is written. The second starts a real Ray head on this machine, bound to
127.0.0.1 only, in the test's own folder, and trains on it (skipped where Ray is not installed:
requirements-dev.txt installs it).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.cluster.client import ClusterError, check_cluster, cluster_address
from engine.cluster.follow import Mirror, event_of
from engine.cluster.protocol import Printer, Reader
from engine.cluster.stage import plan_data
from engine.core.errors import EngineError
from engine.runs.events import EpochEnded
from tests.conftest import ROOT

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--data", "lfw", "--image-size", "32",
        "--max-per-class", "12", "--device", "cpu", "--batch-size", "8"]


# ------------------------------------------------------------------ no Ray needed
def _log(messages: list[dict], files: dict[str, bytes] | None = None) -> str:
    out: list[str] = []
    say = Printer(out.append)
    say(messages[0])
    for name, data in (files or {}).items():
        say.file(name, data)
    for m in messages[1:]:
        say(m)
    return "ray: some line of Ray's own\n" + "".join(out)


def test_the_log_carries_events_and_files_whole_in_any_pieces():
    data = os.urandom(150_000)  # 4 chunks
    text = _log([{"type": "hello"}, {"type": "end", "state": "finished"}], {"best.safetensors": data})
    reader, got = Reader(), []
    for i in range(0, len(text), 1000):  # the log as it is read while it grows
        got += reader.feed(text[i:i + 1000])
    assert [m["type"] for m in got] == ["hello", "file", "end"]
    assert got[1]["name"] == "best.safetensors" and got[1]["data"] == data
    assert reader.gaps == 0


def test_a_replayed_log_skips_what_was_applied():
    text = _log([{"type": "hello"}, {"type": "event", "event": {}}, {"type": "end"}])
    first = Reader()
    assert len(first.feed(text)) == 3
    again = Reader(applied=first.applied - 1)  # attached again: only the last message is new
    assert [m["type"] for m in again.feed(text)] == ["end"]


def test_a_damaged_chunk_is_never_written():
    text = _log([{"type": "hello"}], {"best.safetensors": b"x" * 100})
    lines = text.splitlines(keepends=True)
    chunk = next(i for i, line in enumerate(lines) if '"chunk"' in line)
    lines[chunk] = lines[chunk].replace('"i":0', '"i":1')  # the CRC no longer matches: the line is dropped
    reader = Reader()
    got = reader.feed("".join(lines) + "\n")
    assert [m["type"] for m in got] == ["hello"] and reader.gaps == 0  # the file never completes


def test_metrics_of_a_replayed_epoch_are_not_doubled(tmp_path):
    mirror = Mirror(tmp_path)
    row = dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5)
    for epoch in (1, 2, 2, 1):  # a replay, then a resume that restarted epoch 1
        event = event_of({"event": "EpochEnded", **row, "epoch": epoch})
        assert isinstance(event, EpochEnded)
        mirror.record(event)
    assert [m["epoch"] for m in mirror.metrics()] == [1]


def test_the_address_and_the_data_plan(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_CLUSTER", raising=False)
    assert cluster_address(None) is None and cluster_address(" ") is None
    assert cluster_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    monkeypatch.setenv("WORKBENCH_CLUSTER", "http://h:8265")
    assert cluster_address(None) == "http://h:8265"
    assert plan_data("lfw").ships is None
    folder = tmp_path / "set"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.png").write_bytes(b"0" * 2000)
    plan = plan_data(str(folder))
    assert plan.ships == folder and plan.remote == "data/set" and plan.size == 2000
    with pytest.raises(EngineError, match="over the"):
        plan_data(str(folder), limit=1000)
    assert plan_data("/mnt/on-the-cluster/set").ships is None
    with pytest.raises(EngineError, match="absolute path"):
        plan_data("not/here")


def test_the_driver_names_the_worker_that_died_not_the_one_that_lost_it():
    from engine.cluster.job import Driver

    class ActorDiedError(Exception):
        pass

    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    driver = Driver({"run_id": "r"}, Printer(lambda line: None))
    driver.take([("worker", {"rank": 0, "world": 2, "pid": 11, "node": "10.0.0.1"}),
                 ("worker", {"rank": 1, "world": 2, "pid": 12, "node": "10.0.0.2"})])
    reason = driver.failure(WorkerGroupError({0: RuntimeError("[gloo] Connection closed by peer"),
                                              1: ActorDiedError("The actor died unexpectedly")}))
    assert reason.startswith("worker rank 1 of 2 (pid 12 on 10.0.0.2) died"), reason
    assert "resume" in reason
    driver.take([("refused", {"rank": 0, "reason": "lfw has one class"})])
    assert driver.failure(RuntimeError("x")) == "lfw has one class"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_is_one_line_and_nothing_is_written(tmp_path):
    address = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ClusterError, match="cannot be reached"):
        check_cluster(address, timeout_s=2)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "engine", "train", "--out", str(out), *TINY, "--cluster", address],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot be reached" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_run_that_ended_without_an_epoch_is_summed_up_without_none():
    from engine.training.loop import RunResult

    def result(status: str, acc: float | None, epoch: int | None) -> RunResult:
        return RunResult(status=status, reason="", run_dir=None, best_epoch=epoch, best_val_acc=acc, epochs_done=0,
                         seconds=1.0, history=[], feature_cache=False)

    assert result("failed", None, None).summary() == "failed, no epoch finished"
    assert result("finished", 0.5, 2).summary() == "best val acc 0.5000 (epoch 2)"
    assert result("cancelled", 0.25, 1).summary() == "cancelled, best val acc 0.2500 (epoch 1)"


def test_the_training_page_refuses_an_unreachable_cluster_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """"Where to train" appears once a cluster's address is typed; Start with an unreachable one says so in one
    line and writes nothing. A run training on a cluster is counted apart (it holds no device here), says
    where it trains, and its Cancel button asks its follower to stop the job."""
    import time

    from streamlit.testing.v1 import AppTest

    from engine.runs.process import process_start
    from engine.runs.store import create_run

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("WORKBENCH_CLUSTER", raising=False)
    away = create_run(tmp_path / "runs", {"model": "timm:test_resnet", "data": "lfw", "epochs": 3})
    away.write_status(state="running", pid=os.getpid(), pid_start=process_start(os.getpid()), heartbeat=time.time(),
                      cluster={"address": "http://10.0.0.9:8265", "job_id": "workbench-x-1"})
    at = AppTest.from_file(str(ROOT / "views" / "training.py"), default_timeout=180)
    at.session_state["active_model"], at.session_state["active_weights"] = "timm:test_resnet", "none"
    at.session_state["active_num_classes"] = None
    at.run()
    assert not at.exception
    assert not [r for r in at.radio if r.label == "Where to train"]  # no cluster named: no choice
    assert any("1 run trains on a Ray cluster" in c.value for c in at.caption)
    assert not any("is training" in i.value or "using this machine" in i.value for i in at.info)
    assert any("On the Ray cluster" in c.value and "8265" in c.value for c in at.caption)  # the run says where
    table = at.dataframe[0].value
    assert list(table["where"]) == ["cluster 10.0.0.9:8265"]
    next(r for r in at.radio if r.label == "Data").set_value("lfw faces (built-in)").run()
    next(n for n in at.number_input if n.label == "Image size").set_value(32)
    next(n for n in at.number_input if n.label == "Max images per class (0: all)").set_value(10)
    port = _closed_port()
    next(t for t in at.text_input if t.label == "Ray cluster address").set_value(f"127.0.0.1:{port}").run()
    where = next(r for r in at.radio if r.label == "Where to train")
    where.set_value(f"the cluster at http://127.0.0.1:{port}").run()
    assert not at.exception and next(n for n in at.number_input if n.label == "Ray Train workers").value == 1
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception
    said = [e.value for e in at.error if "cannot be reached" in e.value]
    assert len(said) == 1 and "\n" not in said[0], [e.value for e in at.error]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [away.run_id]  # nothing written
    # the run's Cancel button writes the cancel file its follower stops the Ray job on (the job's side: the
    # real-head test below, with `runs cancel`, which writes the same file)
    next(b for b in at.button if b.label == "Cancel training").click().run()
    assert not at.exception and away.cancel_requested()


# ------------------------------------------------------------------ a real Ray head on this machine
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


class Head:
    """A Ray head started by this module, and every process it started since: its own process group
    (``ray start`` in a new session) and their descendants (workers and a job's driver sit in groups of
    their own). Stopped by the test itself, by process id: never ``ray stop``, which kills every Ray on
    the machine (a developer's own cluster too)."""

    def __init__(self, group: int):
        import psutil

        self.group, self.seen, self.exposed, self.trainers = group, {}, set(), set()
        self._psutil = psutil

    def processes(self) -> list:
        psutil = self._psutil
        roots = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == self.group:
                    roots.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                continue
        self.seen.update(found)
        return list(found.values())

    def listening(self) -> list[tuple[str, int, str]]:
        """(address, port, process) of every TCP socket the head's processes listen on."""
        psutil, out = self._psutil, []
        for proc in self.processes():
            try:
                name = proc.name()
                out += [(c.laddr.ip, c.laddr.port, name) for c in proc.net_connections(kind="tcp")
                        if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        self.exposed.update(s for s in out if s[0] not in LOOPBACK)
        # torch.distributed's rendezvous store and gloo's sockets of a training: seen, so the check saw one
        self.trainers.update(s for s in out if s[2] == "ray::RayTrainWorker")
        return out

    @property
    def beyond_loopback(self) -> list[tuple[str, int, str]]:
        """What listened beyond 127.0.0.1: nothing, torch's rendezvous store of a training included
        (engine/cluster/backend.py binds it to the node's address)."""
        return sorted(self.exposed)

    def watch(self, stop) -> None:
        """Every 2 s while the module's tests run: the listening sockets of the head, its workers and drivers."""
        while not stop.wait(2.0):
            self.listening()

    def _alive(self, proc) -> bool:
        try:  # is_running() checks the start time too: never a reused pid
            return proc.is_running() and proc.status() != self._psutil.STATUS_ZOMBIE
        except self._psutil.Error:
            return False

    def stop(self) -> None:
        import signal
        import time

        self.processes()
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.seen.values() if self._alive(p)]
            if not alive:
                return
            try:
                os.killpg(self.group, sig)
            except ProcessLookupError:
                pass
            for proc in alive:
                try:
                    if os.getpgid(proc.pid) != self.group and self._alive(proc):
                        proc.send_signal(sig)
                except (ProcessLookupError, self._psutil.Error):
                    continue
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(self._alive(p) for p in alive):
                time.sleep(0.2)


@contextmanager
def served_folder(folder: Path):
    """A plain HTTP server of ``folder`` on 127.0.0.1 (a file server inside the team's network), stopped
    by the test itself."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _faces_zip(folder: Path, per_class: int = 10) -> Path:
    """A zip of a folder of 2 classes of real LFW faces (faces / not faces), what a team would name by URL."""
    import zipfile

    import numpy as np
    from PIL import Image
    from skimage.data import lfw_subset

    faces = lfw_subset()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "faces.zip"
    with zipfile.ZipFile(target, "w") as zf:
        for cls, start in (("face", 0), ("other", 100)):
            for i in range(per_class):
                image = Image.fromarray((faces[start + i] * 255).astype(np.uint8)).convert("RGB")
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                zf.writestr(f"faces/{cls}/{i}.png", buffer.getvalue())
    return target


def test_data_by_url_is_fetched_bounded_and_failures_are_one_line(tmp_path):
    from engine.cluster.fetch import fetch_dataset
    from engine.core.errors import DataError

    served = tmp_path / "served"
    zipped = _faces_zip(served)
    (served / "notes.txt").write_text("not a zip")
    with served_folder(served) as base:
        got = fetch_dataset(f"{base}/faces.zip", tmp_path / "fetched")
        assert got.read_bytes() == zipped.read_bytes() and got.name == "faces.zip"
        assert plan_data(f"{base}/faces.zip").ships is None  # named: the job fetches it
        with pytest.raises(DataError, match=r"HTTP 404") as missing:
            fetch_dataset(f"{base}/none.zip", tmp_path / "f2")
        assert "\n" not in str(missing.value) and f"{base}/none.zip" in str(missing.value)
        with pytest.raises(DataError, match="over the 0 MB a cluster job fetches"):
            fetch_dataset(f"{base}/faces.zip", tmp_path / "f3", limit=1000)
        with pytest.raises(DataError, match="is not a zip"):
            fetch_dataset(f"{base}/notes.txt", tmp_path / "f4")
        assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))  # nothing half-written left
    with pytest.raises(DataError, match="http"):
        plan_data("file:///etc/passwd")
    from engine.cluster.fetch import shown

    assert shown("https://user:secret@store.example:8443/sets/a.zip?sig=x") == "https://store.example:8443/sets/a.zip"
    from engine.data.datasets import load_source

    with pytest.raises(DataError, match="fetched by the Ray cluster"):  # this server never fetches a URL
        load_source("http://127.0.0.1:9/faces.zip")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head bound to 127.0.0.1 only, in a short temp folder of its own (its socket paths must be
    short), stopped when the module's tests end.

    ``--node-ip-address 127.0.0.1`` alone is not enough: ``ray start`` replaces a loopback address with
    the machine's own (ray/_private/services.py ``resolve_ip_for_localhost``) and the GCS, the raylet and
    the agents then listen on every interface. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what Ray does
    on a laptop: no multi-node cluster) the node's address stays 127.0.0.1 and every server Ray starts
    binds to it. The fixture checks it: every listening socket of the head, its workers and the jobs'
    drivers, when it starts and every 2 s until it stops."""
    import tempfile
    import threading

    pytest.importorskip("ray", reason="Ray is not installed (requirements-dev.txt installs it)")
    temp = Path(tempfile.mkdtemp(prefix="wbray-", dir="/tmp"))
    dashboard = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # the job's entrypoint runs `python` from the head's PATH: this Python, with the engine's requirements
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    start = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
             "--num-cpus", "2", "--temp-dir", str(temp), "--port", str(_free_port()),
             "--dashboard-port", str(dashboard), "--ray-client-server-port", str(_free_port()),
             "--disable-usage-stats"]
    proc = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: what Head stops
    head = Head(proc.pid)
    stop_watch = threading.Event()
    watcher = threading.Thread(target=head.watch, args=(stop_watch,), daemon=True)
    try:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        sockets = head.listening()
        ports = {port for _, port, _ in sockets}
        assert dashboard in ports and len(sockets) >= 5, sockets  # the check sees the head's servers
        assert not head.exposed, f"the head listens beyond 127.0.0.1: {sorted(head.exposed)}"  # none allowed here
        watcher.start()
        yield f"http://127.0.0.1:{dashboard}"
        head.listening()
    finally:
        stop_watch.set()
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)
    assert not head.beyond_loopback, f"a process of the head listened beyond 127.0.0.1: {head.beyond_loopback}"
    assert head.trainers, "the check never saw a training's sockets: it did not watch while one ran"


def train_cli(out: Path, *args: str, fault: str = "", env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), **({"WORKBENCH_FAULT": fault} if fault else {})} if fault or env else None
    return subprocess.run([sys.executable, "-m", "engine", "train", "--out", str(out), "--json", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=540, env=env)


def _wait(check, timeout_s: float, what: str):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def test_a_killed_worker_is_named_and_the_run_resumed_matches_two_local_processes(ray_head, tmp_path):
    """2 Ray Train workers; rank 1 killed in epoch 2: the run ends failed naming it with epoch 1 kept;
    --resume finishes it on the cluster (a second job) to the accuracy of the same run on 2 local
    processes, and the weights that came back evaluate here."""
    from engine.runs.store import RunDir

    recipe = [*TINY, "--epochs", "2", "--strategy", "full", "--nproc", "2"]
    steps = 3  # lfw, 12 per class, 80% train, batch 8: epoch 2 starts at step 4
    proc = train_cli(tmp_path / "cluster", *recipe, "--cluster", ray_head, fault=f"kill:rank1:step:{steps + 1}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = RunDir(Path(json.loads(proc.stdout)["run_dir"]))
    status = run.status()
    assert status.state == "failed" and "worker rank 1 of 2" in status.reason, status
    assert status.cluster["job_id"] == f"workbench-{run.run_id}-1" and status.cluster["address"] == ray_head
    assert run.train_state_path.is_file() and [m["epoch"] for m in run.metrics()] == [1]

    again = train_cli(tmp_path / "cluster", "--resume", run.run_id)  # the run's status names its cluster
    assert again.returncode == 0, again.stderr[-3000:]
    status = run.status()
    assert status.state == "finished" and [m["epoch"] for m in run.metrics()] == [1, 2], status
    assert status.cluster["attempt"] == 2 and run.checkpoint("best").is_file()

    local = train_cli(tmp_path / "local", *recipe)
    assert local.returncode == 0, local.stderr[-3000:]
    here = RunDir(Path(json.loads(local.stdout)["run_dir"]))
    assert abs(run.metrics()[-1]["val_acc"] - here.metrics()[-1]["val_acc"]) <= 0.015

    from engine.outputs.evaluate import evaluate_run

    assert evaluate_run(run, kind="best", split="val") is not None  # the weights that came back work here


def test_a_restarted_app_reattaches_and_cancel_from_the_cli_stops_the_job(ray_head, tmp_path):
    """A run started in the background (as the app starts one); its follower killed (the app's server
    restarted): orphaned() finds it and reattach() follows it again; `runs cancel` stops the Ray job and
    the run ends cancelled. The app's Cancel button writes the same cancel file the follower reads."""
    import signal

    from ray.job_submission import JobSubmissionClient

    from engine.cluster.submit import orphaned, reattach
    from engine.runs.store import RunDir

    root = tmp_path / "runs"
    proc = train_cli(root, *TINY, "--epochs", "5000", "--nproc", "1", "--cluster", ray_head, "--background")
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = json.loads(proc.stdout)
    run = RunDir(Path(started["run_dir"]))
    _wait(lambda: run.status().progress is not None, 180, "the job's first steps read back")
    os.kill(started["pid"], signal.SIGKILL)
    assert _wait(lambda: run.status().state == "interrupted", 30, "the run reads interrupted")
    assert [(r.run_id, a) for r, a in orphaned(root)] == [(run.run_id, ray_head)]

    def where() -> tuple[int, int]:
        progress = run.status().progress
        return (progress.epoch, progress.step) if progress else (0, 0)

    seen = where()
    pid = reattach(run, ray_head, root)
    try:
        _wait(lambda: run.status().state == "running" and where() != seen, 120, "the new follower reads on")
        assert orphaned(root) == []
        cancel = subprocess.run([sys.executable, "-m", "engine", "runs", "cancel", run.run_id, "--out", str(root)],
                                cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert cancel.returncode == 0, cancel.stderr[-2000:]
        assert run.status().state == "cancelled", (cancel.stdout, run.status())
        assert f"run {run.run_id}: cancelled" in cancel.stdout
        client = JobSubmissionClient(ray_head)
        job_id = run.status().cluster["job_id"]
        stopped = _wait(lambda: str(client.get_job_status(job_id).value) in ("STOPPED", "SUCCEEDED", "FAILED")
                        and str(client.get_job_status(job_id).value), 60, "the job ends")
        assert stopped == "STOPPED"
        _wait(lambda: not _alive(pid), 30, "the follower exits")
    finally:
        if _alive(pid):  # never left behind, whatever failed above
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    from engine.runs.process import pid_alive

    return pid_alive(pid)


def test_data_named_by_url_is_fetched_by_the_job_and_an_auto_plan_comes_back(ray_head, tmp_path):
    """One Ray Train worker; the data is a zip on a file server the cluster reads (never this machine),
    and --strategy auto chooses on the cluster: the app's copy of the run gets the plan from the job's
    log, with the data still named by its URL. The command that submits and follows runs without Ray."""
    from engine.runs.store import RunDir

    # this machine needs no Ray (engine/cluster/jobs_http.py): the command runs where `import ray` fails
    blocker = tmp_path / "no-ray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('Ray is not installed on the app machine')\n")
    without_ray = {"PYTHONPATH": str(blocker)}
    with served_folder(_faces_zip(tmp_path / "served").parent) as base:
        url = f"{base}/faces.zip"
        proc = train_cli(tmp_path / "runs", "--model", "timm:test_resnet", "--weights", "none", "--data", url,
                         "--image-size", "32", "--device", "cpu", "--batch-size", "8", "--epochs", "1",
                         "--strategy", "auto", "--cluster", ray_head, env=without_ray)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(Path(json.loads(proc.stdout)["run_dir"]))
    config, status = run.config(), run.status()
    assert status.state == "finished" and config["data"] == url, status
    assert config["auto_plan"]["status"] == "chosen" and config["plan"] == config["auto_plan"]["plan"]
    assert status.auto_plan and status.auto_plan.startswith("auto plan: ")
    assert "auto plan: " in proc.stderr and run.checkpoint("best").is_file()
    # a URL the job cannot fetch is a DataError in the worker: the driver's one-line refusal, as for a path
    # that is not there (test_the_driver_names_the_worker_that_died_not_the_one_that_lost_it; the message:
    # test_data_by_url_is_fetched_bounded_and_failures_are_one_line)
