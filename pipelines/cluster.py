"""The process's one connection to Ray, made on first need by whichever stage runs first (sharding, training,
tuning, sampling, inpainting) and then shared by the rest. The sharding job (data_prep) is handed it as a callable.

Without RAY_ADDRESS a command starts its own local Ray, on 127.0.0.1 only (the CLI sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
before Ray is imported; Ray reads it once); it never joins a head it happens to find. With RAY_ADDRESS it joins that
cluster, after checking within seconds that its head answers."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from urllib.parse import urlsplit

import ray

log = logging.getLogger(__name__)
PROBE_SECONDS = 5.0


class ClusterError(RuntimeError):
    """No Ray cluster answers where RAY_ADDRESS points; the message says which address and what to do."""


def head_address(address: str) -> tuple[str, int] | None:
    """(host, port) of the head RAY_ADDRESS names: host:port, ray://host:port, or "auto" (the head `ray start` recorded on
    this machine; None when it recorded none)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address("auto") or ""
        if not address:
            return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    return (parts.hostname or "", parts.port or 6379) if parts.hostname else None


def check_head(address: str, timeout: float = PROBE_SECONDS) -> None:
    """A ClusterError naming ``address`` unless a TCP connection to its head opens within ``timeout`` seconds (ray.init
    would otherwise wait minutes on a head that went away)."""
    head = head_address(address)
    if head is None:
        raise ClusterError(f"RAY_ADDRESS={address}: no Ray head was started on this machine (`ray start --head`); "
                           "unset RAY_ADDRESS to start a local Ray")
    try:
        socket.create_connection(head, timeout=timeout).close()
    except OSError as err:
        raise ClusterError(f"RAY_ADDRESS={address}: no Ray head answers at {head[0]}:{head[1]} within {timeout:.0f} s "
                           f"({err.strerror or type(err).__name__}); start it (`ray start --head`) or unset RAY_ADDRESS to "
                           "start a local Ray") from None


def connect_ray() -> None:
    """Join the cluster RAY_ADDRESS names, else start a local instance on 127.0.0.1; nothing when this process is
    connected. Says in one line which. Worker logs reach this console (rank 0's progress lines)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init puts its own (which aborts the process) in its place
    if address:
        check_head(address)
        ray.init(address=address)
        how = f"joined the Ray cluster at {address}"
    else:
        ray.init(address="local")
        how = f"started a local Ray on {ray.util.get_node_ip_address()} (set RAY_ADDRESS to join a cluster)"
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # the CLI's: SIGTERM stops a command as Ctrl-C does
    resources = ray.cluster_resources()
    log.info("%s: %d CPUs, %d GPUs", how, resources.get("CPU", 0), resources.get("GPU", 0))
