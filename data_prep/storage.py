"""Where shards live: a local directory or any fsspec URL (s3://, gs://, …), with atomic writes."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from ncsn.atomic import atomic_write


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def absolute_location(location: str | os.PathLike) -> str:
    """A URL as it is, a local path made absolute: Ray workers and trials run in directories of their own."""
    location = str(location)
    return location if is_url(location) else str(Path(location.removeprefix("file://")).resolve())


def sha256_and_size(f: BinaryIO) -> tuple[str, int]:
    """sha256 hex digest and byte count of an open binary file, read to its end."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


class Storage:
    """Files under ``root``. Local writes go to a temp file beside the target, then os.replace;
    object stores write whole objects, which readers never see half-written."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.remote = is_url(self.root)
        if self.remote:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        else:
            self.base = str(Path(self.root.removeprefix("file://")).resolve())

    @staticmethod
    def check_relative(rel: object) -> str:
        """``rel`` if it names a file below the root ("train/x.tar"); an absolute path, "..", "." or an empty part is a
        ValueError, so no name read from a manifest reaches outside its folder."""
        if not isinstance(rel, str) or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
            raise ValueError(f"{rel!r} is not a relative path inside the shard folder")
        return rel

    def path(self, rel: str) -> str:
        """The full local path or URL of ``rel`` (which must stay below the root)."""
        rel = self.check_relative(rel)
        if self.remote:
            return self.root.rstrip("/") + "/" + rel
        return os.path.join(self.base, rel)

    def _fs_path(self, rel: str) -> str:
        return self.base.rstrip("/") + "/" + self.check_relative(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fs_path(rel)) if self.remote else os.path.exists(self.path(rel))

    def size(self, rel: str) -> int | None:
        try:
            return self.fs.size(self._fs_path(rel)) if self.remote else os.path.getsize(self.path(rel))
        except (FileNotFoundError, OSError):
            return None

    def put_atomic(self, local_file: str, rel: str) -> None:
        """Move ``local_file`` to ``rel``."""
        if self.remote:
            self.fs.put_file(local_file, self._fs_path(rel))
            os.unlink(local_file)
            return
        atomic_write(self.path(rel), lambda tmp: shutil.move(local_file, tmp))

    def write_text_atomic(self, rel: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        self.put_atomic(tmp, rel)

    def read_text(self, rel: str) -> str:
        if self.remote:
            with self.fs.open(self._fs_path(rel), "r", encoding="utf-8") as f:
                return f.read()
        return Path(self.path(rel)).read_text(encoding="utf-8")

    def remove(self, rel: str) -> None:
        if self.remote:
            self.fs.rm(self._fs_path(rel))
        else:
            Path(self.path(rel)).unlink(missing_ok=True)

    def sha256_and_size(self, rel: str) -> tuple[str, int]:
        with (self.fs.open(self._fs_path(rel), "rb") if self.remote else open(self.path(rel), "rb")) as f:
            return sha256_and_size(f)
