"""Separate hosts on this kernel, for the two-host tests: each host is a network namespace (its own address and
loopback), a mount namespace (its own /tmp, /dev/shm and $HOME) and a UTS namespace (its own host name), so hosts share
neither a network stack nor a disk.
The hosts hang off a bridge in a namespace of their own ("lan", 10.231.0.254), which also holds the services every
host reaches: the S3-compatible store and the MLflow server. Needs root; whatever it makes it removes, also when a
test fails. Only addresses inside these namespaces are ever used. Also a small disk to fill (small_disk)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.231.0"  # private (RFC 1918), and only inside the namespaces made here
LAN_ADDRESS = f"{SUBNET}.254"


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make the hosts (not root, or no network namespaces), or None when it can."""
    if os.geteuid() != 0:
        return "the two-host tests make network and mount namespaces, which needs root"
    probe = f"ncsn-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """One host: ``run``/``popen`` start a command inside it (its network and its own disk), as a login on that VM."""

    name: str
    address: str
    netns: str
    port: str  # its cable's end on the bridge, in the lan namespace
    holder: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def boot(self) -> None:
        """The host's own disk: tmpfs on /tmp (its $HOME is /tmp/home) and /dev/shm, in a mount namespace held by a
        sleeping process. The code (the repository with its virtual environment) stays visible, as on a VM image,
        also when the repository itself lies under /tmp."""
        script = ('mount --bind "$0" /mnt && mount -t tmpfs -o size=4g,mode=1777 tmpfs /tmp && mkdir -p "$0" /tmp/home && '
                  'mount --move /mnt "$0" && mount -t tmpfs -o size=2g tmpfs /dev/shm && hostname "$1" && exec sleep infinity')
        self.holder = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation",
                                        "private", "sh", "-c", script, str(ROOT), f"ncsn-{self.name}"], start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.disk("home").is_dir():
            assert self.holder.poll() is None and time.monotonic() < deadline, f"host {self.name} did not boot"
            time.sleep(0.05)

    def disk(self, path: str) -> Path:
        """``path`` under the host's /tmp, as the test (outside every host) reads it."""
        return Path(f"/proc/{self.holder.pid}/root/tmp") / path

    def _argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", "--target", str(self.holder.pid), "--net", "--mount", "--uts", "--", *argv]

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(self._argv(argv), env={**env, "HOME": "/tmp/home"}, cwd="/", stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(argv), env={**env, "HOME": "/tmp/home"}, cwd="/", capture_output=True, text=True, timeout=timeout)

    def copy_in(self, local: Path, path: str) -> None:
        """The directory ``local`` (outside every host) copied to ``path`` under the host's /tmp, as baked into its image."""
        packed = subprocess.run(["tar", "-C", str(local), "-c", "."], capture_output=True, check=True).stdout
        subprocess.run(self._argv(["sh", "-c", f"mkdir -p /tmp/{path} && tar -C /tmp/{path} -x"]), input=packed, check=True)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (what dies with the VM), its holder left out."""
        own = os.stat(f"/var/run/netns/{self.netns}").st_ino
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.holder.pid:
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "net").st_ino == own:
                        found.append(int(entry.name))
        return found

    def power_off(self) -> list[int]:
        """SIGKILL every process of the host, as when its VM dies (again until none is left: one being forked as the
        others die is killed too); its disk (the holder's mounts) stays. Returns the PIDs killed."""
        killed: list[int] = []
        deadline = time.monotonic() + 30
        while pids := self.pids():
            assert time.monotonic() < deadline, f"host {self.name}: processes {pids} outlived SIGKILL"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += [p for p in pids if p not in killed]
            time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs = [p for p in self.procs if p.poll() is None]
        return killed


class Lan:
    """``n`` hosts (h0 at 10.231.0.1, h1 at .2, …) on one bridge, and the lan namespace for the services. Use as a
    context manager: on exit every process started in a host or the lan is killed and every namespace removed."""

    def __init__(self, n: int = 2):
        tag = f"{os.getpid() % 100000}"
        self.netns = f"ncsn{tag}-lan"
        self.hosts = [Host(f"h{i}", f"{SUBNET}.{i + 1}", f"ncsn{tag}-h{i}", f"nb{tag}h{i}") for i in range(n)]
        self.services: list[subprocess.Popen] = []

    def __enter__(self) -> "Lan":
        try:
            _ip("netns", "add", self.netns)
            _ip("-n", self.netns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.netns, "addr", "add", f"{LAN_ADDRESS}/24", "dev", "br0")
            for dev in ("lo", "br0"):
                _ip("-n", self.netns, "link", "set", dev, "up")
            for host in self.hosts:
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.port, "type", "veth", "peer", "name", f"{host.port}x")
                _ip("link", "set", f"{host.port}x", "netns", host.netns)
                _ip("link", "set", host.port, "netns", self.netns)
                _ip("-n", self.netns, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.netns, "link", "set", f"{host.port}x", "name", "eth0")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                for dev in ("lo", "eth0"):
                    _ip("-n", host.netns, "link", "set", dev, "up")
                host.boot()
        except BaseException:
            self.__exit__()
            raise
        return self

    def service(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """A server in the lan namespace (on the shared root filesystem: the store's and the tracking server's disks)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], env=env, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.services.append(proc)
        return proc

    def in_lan(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        """A command that reaches the services (uploads, checks), run in the lan namespace."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], env=env, capture_output=True, text=True, timeout=timeout)

    def cut(self, host: Host) -> None:
        """Unplug ``host``'s cable: no packet to or from it until ``plug``."""
        _ip("-n", self.netns, "link", "set", host.port, "down")

    def plug(self, host: Host) -> None:
        _ip("-n", self.netns, "link", "set", host.port, "up")

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            if host.holder is not None:
                host.power_off()
                os.killpg(host.holder.pid, signal.SIGKILL)
                host.holder.wait(10)
        for proc in self.services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for name in [h.netns for h in self.hosts] + [self.netns]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` (e.g. "64k") mounted on the new directory ``path``, to fill: yields a function that gives it
    another size (space freed). Needs root (the test is skipped, naming why, without it); unmounted at the end."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)
