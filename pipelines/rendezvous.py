"""Ray Train's torch process group with its rendezvous (torch's TCPStore) bound to one address, not every interface:
loopback when all workers share a node, otherwise the Ray node address of rank 0 (the address the cluster uses).
Across hosts each rank's collective transport (Gloo, NCCL's sockets) uses the interface of its own Ray node address,
not the address the host name resolves to (loopback where /etc/hosts maps it there, which other hosts cannot reach)."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import psutil
import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0's bound socket, kept open until the store takes it over


def _listen(host: str) -> int:
    """On rank 0: bind and listen on ``host`` at a free port (held, so no other process can take it); the port."""
    global _listener
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _listener = socket.socket(family, socket.SOCK_STREAM)
    _listener.bind((host, 0))
    _listener.listen(128)
    return _listener.getsockname()[1]


def interface_of(address: str) -> str | None:
    """The name of this host's network interface that holds ``address``, or None."""
    return next((name for name, addresses in psutil.net_if_addrs().items() if any(a.address == address for a in addresses)), None)


def _join(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: int) -> None:
    """Every rank: the TCPStore (served by rank 0 on its bound socket) and the process group over it; across hosts, the
    backend's sockets on the interface of this node's Ray address unless the user named one (GLOO_/NCCL_SOCKET_IFNAME)."""

    global _listener
    variable = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}.get(backend)
    if host != "127.0.0.1" and variable and variable not in os.environ:
        interface = interface_of(ray.util.get_node_ip_address())
        if interface:
            os.environ[variable] = interface
    timeout = datetime.timedelta(seconds=timeout_s)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    if rank == 0:
        fd, _listener = _listener.detach(), None  # the store owns the listening socket from here on
        store = dist.TCPStore(host, port, world_size, True, timeout=timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundTorchConfig") -> None:
        ips = worker_group.execute(ray.util.get_node_ip_address)
        host = "127.0.0.1" if len(set(ips)) == 1 else ips[0]
        port = worker_group.execute_single(0, _listen, host)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _join, backend_config.backend, host, port, i, len(ips), backend_config.timeout_s)
                 for i in range(len(ips))])


@dataclass
class BoundTorchConfig(TorchConfig):
    """TorchTrainer's ``torch_config`` whose process-group rendezvous listens on one address (see the module doc)."""

    @property
    def backend_cls(self):
        return _BoundBackend
