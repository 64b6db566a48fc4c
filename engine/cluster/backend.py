"""Ray Train's torch set-up with the rendezvous store on the node's address, not on every interface.

Ray Train's ``TorchConfig`` initialises the workers' process group with ``init_method`` tcp:// or
env://; either way torch's rank 0 then hosts the rendezvous store (``TCPStore``), and torch 2.14 gives
that server no bind address: it listens on ``::``, every interface of the node, for as long as the
training runs (measured with ``ss -ltnp`` on the test head; gloo's own connections bind to the given
address). On a cluster inside a team's network that is one more open port; on the test head, the one
server that broke "bound to 127.0.0.1 only".

So rank 0's worker hosts the store itself, on a socket bound to its node's address
(``TCPStore(master_listen_fd=...)``, the libuv-free daemon that accepts one), and every rank, rank 0
included, joins it as a client: torch's rendezvous does exactly that when TORCHELASTIC_USE_AGENT_STORE
is set and MASTER_ADDR/MASTER_PORT name the store (what torchrun's agent does with its own store).
The rest is Ray Train's own set-up: its environment variables, then ``init_process_group`` on every
worker. A Ray without these internals (a version that moved them) gets its stock ``TorchConfig``.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any

_STORE: Any = None  # rank 0's store, alive as long as its worker process (the process group needs it)


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def host_store(host: str, world: int, timeout_s: int) -> int:
    """On rank 0's worker: a store listening on ``host`` only; returns its port."""
    import torch.distributed as dist

    global _STORE
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # the store takes the socket's descriptor (and closes it with itself): Python must not close it too
    _STORE = dist.TCPStore(host, port, world, True, timeout=datetime.timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=False)
    return port


def join_store(host: str, port: int) -> None:
    """On every worker: the rendezvous joins the store at ``host:port`` as a client."""
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")


def torch_config(backend: str) -> Any:
    """Ray Train's torch config for ``backend`` (gloo, nccl), with the store bound as above."""
    from ray.train.torch import TorchConfig

    try:
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
    except ImportError:  # internals of another Ray: its own set-up (the store on every interface)
        return TorchConfig(backend=backend)

    class BoundBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            import ray

            host = worker_group.execute_single(0, node_address)
            port = worker_group.execute_single(0, host_store, host, len(worker_group), backend_config.timeout_s)
            worker_group.execute(join_store, host=host, port=port)
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray's own on_start (v1 sets them at training start)
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                       world_rank=i, world_size=len(worker_group),
                                                       init_method="env://", timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])

    class BoundTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return BoundBackend

    return BoundTorchConfig(backend=backend)
