"""Ray Train's torch process group, with every socket it opens bound to the address the workers
meet at, never to every interface.

Ray Train's own setup (``TorchConfig``) has each worker call ``init_process_group`` with
``env://``: rank 0's ``TCPStore`` then listens on all interfaces (``*:port``), and gloo binds
to whatever the host name resolves to. On a local Ray, which binds 127.0.0.1 only, that opened
a port to the network for every run (the demo's no-listening-beyond-loopback check found it).
Neither torch nor Ray Train takes a bind address, so this backend replaces the one step:

- rank 0 binds a socket to the master address Ray Train chose (the node's address: 127.0.0.1
  on a local Ray, the node's IP on a cluster, which is where the other ranks connect anyway)
  and hands it to its ``TCPStore`` (``master_listen_fd``); the others connect as before;
- on a loopback master, gloo and nccl's bootstrap are pointed at the loopback interface
  (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``), where the host name may resolve to a LAN
  address.

What this backend does not do of Ray Train's ``on_start``, because mammo_ray never asks for it:
choose the backend from the resources (the backend must be named: gloo here), ``init_method``
other than ``env``, TPUs, and the V1 worker group (Train V2 is Ray 2.60's default); each is
refused rather than ignored. Shutdown is Ray Train's, unchanged.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.utils import get_address_and_port
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return None


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def init_group(backend: str, rank: int, world: int, addr: str, port: int, timeout_s: int) -> None:
    """One worker's ``init_process_group`` through a store bound to ``addr`` only."""
    timeout = timedelta(seconds=timeout_s)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)  # as Ray Train's env:// sets them
    if _is_loopback(addr):
        name = loopback_interface()
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if name and var not in os.environ:
                os.environ[var] = name
    if rank == 0:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(max(world, 128))
            # the store owns the descriptor from here and closes it when it is freed: detached,
            # so that Python's socket object never closes that number a second time
            store = dist.TCPStore(addr, port, world, True, timeout, master_listen_fd=sock.detach(),
                                  wait_for_workers=False)
        finally:
            sock.close()  # a no-op once detached; frees the port if binding or the store failed
    else:
        store = dist.TCPStore(addr, port, world, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        if not backend_config.backend or backend_config.init_method != "env":
            raise ValueError(f"BoundTorchConfig(backend={backend_config.backend!r}, init_method="
                             f"{backend_config.init_method!r}): name the backend, with init_method='env'")
        if isinstance(worker_group, V1WorkerGroup):
            raise ValueError("BoundTorchConfig needs Ray Train V2's worker group (RAY_TRAIN_V2_ENABLED=1)")
        backend = backend_config.backend
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_torch_distributed_env_vars)
        # positional: execute_single_async's own first parameter is called ``rank``
        world = len(worker_group)
        ray.get([worker_group.execute_single_async(i, init_group, backend, i, world, addr, port, backend_config.timeout_s)
                 for i in range(world)])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the master address only (module doc)."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
