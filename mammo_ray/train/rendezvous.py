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
- on a loopback master, gloo is pointed at the loopback interface (``GLOO_SOCKET_IFNAME``),
  where the host name may resolve to a LAN address.

The rest (backend choice, env vars, shutdown) is Ray Train's ``_TorchBackend`` unchanged.
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
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# rank 0's listening socket: the TCPStore uses its file descriptor, so the socket object must
# outlive the store (closing it would close the store's fd)
_LISTENER: list[socket.socket] = []


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
    if _is_loopback(addr) and "GLOO_SOCKET_IFNAME" not in os.environ:
        name = loopback_interface()
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name
    if rank == 0:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(world, 128))
        _LISTENER.append(sock)
        store = dist.TCPStore(addr, port, world, True, timeout, master_listen_fd=sock.fileno(),
                              wait_for_workers=False)
    else:
        store = dist.TCPStore(addr, port, world, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, init_group, backend=backend, rank=i, world=len(worker_group),
                                                   addr=addr, port=port, timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the master address only (module doc)."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
