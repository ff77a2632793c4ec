"""One command at a time per run directory: an exclusive lock (flock) on <run_dir>/.ncsn-lock, held while `train`, `run`
or `tune` writes there. The kernel releases it when the holding process ends, so a killed command leaves no stale lock;
the file names the holder (pid, host, command, start time) for the one line a second command is refused with."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipelines.config import ConfigError

LOCK_FILE = ".ncsn-lock"


@contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; a ConfigError naming the holder when another process holds it."""
    path = Path(run_dir).resolve() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run_dir {path.parent} is in use by another command ({_holder(fd)}); wait for it to finish or "
                              "choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "a process that has not written its name yet"
