"""Where shards live: a local directory or any fsspec URL (s3://, gs://, …), with atomic writes."""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import fsspec

from ncsn._checks import first_line
from ncsn.atomic import atomic_write

# S3 calls bounded where the user set nothing (FSSPEC_S3='{"config_kwargs": {...}}', read by fsspec on import in every
# process, sets them): botocore waits 60 s to connect and 60 s per read, retried by botocore and then 5 times by s3fs,
# many minutes on an endpoint that accepts and never answers. Here each of s3fs's 5 attempts is one botocore attempt of
# at most 5 s to connect and 15 s per read: a hung endpoint fails in about 75 s, in one line naming it. (botocore fills
# in the dict it is given, so fsspec gets a copy.)
S3_BOUNDS = {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 1}}
fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", copy.deepcopy(S3_BOUNDS))


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str | os.PathLike, what: str) -> Path:
    """``location`` as a local path; a StorageError naming ``what`` when it is an object-store URL (writing it locally would
    make a folder called "s3:")."""
    if is_url(str(location)):
        raise StorageError(f"{what} {location}: a local path is needed here; object-store URLs are for shards "
                           "(shard --output, data.shards), checkpoints and cluster.storage_path")
    return Path(location)


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


class StorageError(OSError):
    """A location that cannot be read or written: missing, refused, unreachable; the message is one line naming it."""


class MissingObject(StorageError, FileNotFoundError):
    """A file or object that is not there (a FileNotFoundError too, so callers treat local and remote alike)."""


def _is_connection_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "TimeoutError"})


def storage_error(url: str, err: BaseException) -> StorageError:
    """One line for what went wrong reaching ``url``: a missing object, refused credentials or an unreachable store."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, FileNotFoundError):
        return MissingObject(f"{url} does not exist")
    if isinstance(err, PermissionError) or "ACCESS_DENIED" in str(err):  # s3fs's, then pyarrow's (Ray Train's storage)
        return StorageError(f"access to {url} was refused ({err}): check the credentials the nodes use "
                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or the node's role)")
    if _is_connection_error(err) or "NETWORK_CONNECTION" in str(err):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
        where = f"endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "the object store"
        return StorageError(f"cannot reach {where} for {url}: {err}")
    return StorageError(f"{url}: {type(err).__name__}: {first_line(err)}")


def open_binary(url: str) -> BinaryIO:
    """``url`` (a local path or an fsspec URL) opened for streaming reads; a StorageError names it if it cannot be."""
    try:
        if is_url(url):
            return fsspec.open(url, "rb").open()
        return open(url.removeprefix("file://"), "rb")
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the URL
        raise storage_error(url, err) from None


class Storage:
    """Files under ``root``. Local writes go to a temp file beside the target, then os.replace;
    object stores write whole objects, which readers never see half-written."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.remote = is_url(self.root)
        if self.remote:
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

    def _call(self, rel: str, fn, *args):
        """``fn(*args)`` on the object store, its failures as one StorageError line naming ``rel``'s URL."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            raise storage_error(self.path(rel), err) from None

    def children(self) -> list[str]:
        """The names directly under the root, sorted; none when the root does not exist."""
        if not self.remote:
            return sorted(os.listdir(self.base)) if os.path.isdir(self.base) else []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False)) if self.fs.exists(self.base) else []
        except Exception as err:  # noqa: BLE001
            raise storage_error(self.root, err) from None

    def exists(self, rel: str) -> bool:
        return self._call(rel, self.fs.exists, self._fs_path(rel)) if self.remote else os.path.exists(self.path(rel))

    def put_atomic(self, local_file: str, rel: str) -> None:
        """Move ``local_file`` to ``rel``."""
        if self.remote:
            self._call(rel, self.fs.put_file, local_file, self._fs_path(rel))
            os.unlink(local_file)
            return
        atomic_write(self.path(rel), lambda tmp: shutil.move(local_file, tmp))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.put_atomic(tmp, rel)

    def write_text_atomic(self, rel: str, text: str) -> None:
        self.write_bytes_atomic(rel, text.encode("utf-8"))

    def read_bytes(self, rel: str) -> bytes:
        with open_binary(self.path(rel)) as f:
            return self._call(rel, f.read)

    def read_text(self, rel: str) -> str:
        """The UTF-8 text of ``rel``; a missing file is MissingObject (a FileNotFoundError), other failures a StorageError."""
        return self.read_bytes(rel).decode("utf-8")

    def remove(self, rel: str) -> None:
        if self.remote:
            self._call(rel, self.fs.rm, self._fs_path(rel))
        else:
            Path(self.path(rel)).unlink(missing_ok=True)

    def sha256_and_size(self, rel: str) -> tuple[str, int]:
        with open_binary(self.path(rel)) as f:
            return self._call(rel, sha256_and_size, f)
