"""Image data-set readers. Each yields Records (key, uint8 HWC image, optional label) in a fixed order,
per split, and can read any index range. Archive sources (CIFAR-10, MNIST) hold their arrays once counted, so the
sharding job ships the source object to its tasks through Ray's object store and the archive is decompressed once."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "validation", "test")
POOLS = ("train", "test")  # a data set's own splits; the validation split is held out of its training pool


class SourceError(ValueError):
    """A data set that cannot be read: names the file and what is wrong with it."""


@dataclass(frozen=True)
class Record:
    """One image: a unique key, uint8 pixels of shape (H, W, C), and a class label or None."""

    key: str
    image: np.ndarray
    label: int | None


class Source:
    """A data set with train, validation and test splits, readable by index range. Subclasses describe their own two
    pools (``pool_size``, ``record``: the official train and test splits, or a held-out test rule); the validation split
    is drawn from the training pool here, uniformly (seeded), so training never sees it and tuning can select on it
    while the test split judges. Not stratified by label: KID's U-statistic treats each set as independent draws, and
    stratified sets are more alike than that: two stratified sets of 297 digits score KID −0.032 on average (sd 0.004 over
    60 pairs), uniform ones −0.002 (sd 0.018); tests/test_evaluation.py pins it."""

    name: str = ""
    classes: list[str] | None = None
    split_rule: str = "the data set's official test split"  # recorded in the manifest
    validation_fraction: float = 0.1  # of the training pool
    validation_seed: int = 0

    def pool_size(self, pool: str) -> int:
        raise NotImplementedError

    def record(self, pool: str, i: int) -> Record:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the input (paths, sizes, modification times); a change means re-sharding."""
        raise NotImplementedError

    def validation_size(self) -> int:
        return round(self.validation_fraction * self.pool_size("train"))

    @property
    def validation_rule(self) -> str:
        """How the validation split was drawn (recorded in the manifest)."""
        return (f"{self.validation_size()} of the {self.pool_size('train')} training-pool images held out uniformly at random "
                f"(seed {self.validation_seed}, not stratified); never trained on")

    def _indices(self, split: str) -> np.ndarray:
        """Indices into the pool behind ``split``, in pool order."""
        _check_split(split)
        if split == "test":
            return np.arange(self.pool_size("test"))
        if not hasattr(self, "_held"):
            n = self.pool_size("train")
            held = held_out_indices(n, self.validation_size(), self.validation_seed)
            self._held = (np.setdiff1d(np.arange(n), held), held)
        return self._held[split == "validation"]

    def count(self, split: str) -> int:
        return len(self._indices(split))

    def read(self, split: str, start: int, stop: int) -> Iterator[Record]:
        pool = "test" if split == "test" else "train"
        for i in self._indices(split)[start:stop]:
            yield self.record(pool, int(i))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SourceError(f"split must be one of {SPLITS}, got {split!r}")


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------- digits (offline default)
def held_out_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` indices drawn uniformly without replacement (seeded), sorted."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded, stratified held-out set (sorted indices): each class gives its share of ``n`` (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]))


class DigitsSource(Source):
    """scikit-learn's bundled load_digits: 1797 8×8 digits, 0..16 rescaled to 0..255. It has no official test split:
    297 images drawn uniformly (seeded) are held out; of the other 1500, another 297 drawn the same way are the
    validation split (equal to the test split in size, so the held-out floor compares like with like)."""

    name = "digits"
    classes = [str(i) for i in range(10)]
    n_test, n_validation, seed = 297, 297, 0
    split_rule = f"{n_test} of 1797 images held out uniformly at random (seed {seed}, not stratified)"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits  # heavy: scikit-learn, for the digits only

        digits = load_digits()
        self._images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        self._labels = digits.target.astype(int)
        test = held_out_indices(len(self._labels), self.n_test, self.seed)
        self._pools = {"test": test, "train": np.setdiff1d(np.arange(len(self._labels)), test)}

    def validation_size(self) -> int:
        return self.n_validation

    def pool_size(self, pool: str) -> int:
        return len(self._pools[pool])

    def record(self, pool: str, i: int) -> Record:
        j = self._pools[pool][i]
        return Record(f"digits-{j:05d}", self._images[j], int(self._labels[j]))

    def fingerprint(self) -> dict:
        import sklearn  # heavy: scikit-learn, for the digits only

        return {"sklearn": sklearn.__version__, "split": self.split_rule, "validation": self.validation_rule}


# ---------------------------------------------------------------- CIFAR-10 python tarball
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows builtin containers and numpy arrays only, so a malicious pickle cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def restricted_unpickle(data: bytes, origin: str) -> object:
    """Unpickle ``data`` (from ``origin``, named in errors) allowing only containers and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise SourceError(f"{origin}: unsafe or invalid pickle: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure inside a foreign pickle is a bad input
        raise SourceError(f"{origin}: cannot unpickle: {type(err).__name__}: {err}") from None


class Cifar10Source(Source):
    """The official cifar-10-python.tar.gz: data_batch_1..5 (train, 50k) and test_batch (10k), 32×32×3."""

    name = "cifar10"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    per_batch = 10_000

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"CIFAR-10 tarball {self.path} does not exist (expected cifar-10-python.tar.gz)")
        self._batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # all six, read in one pass over the gzip stream: 180 MB

    def _members(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the wanted batch members, in archive order, stopping after the last one."""
        left = set(wanted)
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:  # a gzip stream is read from the start: no index scan, stop early
                    name = member.name.rsplit("/", 1)[-1]
                    if name in left:
                        left.discard(name)
                        yield name, tar.extractfile(member).read()
                        if not left:
                            return
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SourceError(f"{self.path} is not a readable tar archive: {err}") from None
        if left:
            raise SourceError(f"{self.path} has no member {sorted(left)[0]}: is it cifar-10-python.tar.gz?")

    def _parse(self, name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        origin = f"{self.path}:{name}"
        batch = restricted_unpickle(raw, origin)
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise SourceError(f"{origin}: expected a dict with b'data' and b'labels'")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise SourceError(f"{origin}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} {data.shape}, {len(labels)} labels")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(int)

    def _batch(self, member_name: str) -> tuple[np.ndarray, np.ndarray]:
        if not self._batches:
            self._batches = {name: self._parse(name, raw) for name, raw in self._members(set(_CIFAR_BATCHES["train"] + _CIFAR_BATCHES["test"]))}
        return self._batches[member_name]

    def _pool(self, pool: str) -> tuple[np.ndarray, np.ndarray]:
        """All images and labels of a pool (its batches concatenated once; the arrays are the batches' own for test)."""
        if not hasattr(self, "_pools"):
            self._pools = {}
        if pool not in self._pools:
            parts = [self._batch(b) for b in _CIFAR_BATCHES[pool]]
            self._pools[pool] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._pools[pool]

    def pool_size(self, pool: str) -> int:
        return len(self._pool(pool)[1])

    def record(self, pool: str, i: int) -> Record:
        images, labels = self._pool(pool)
        return Record(f"cifar10-{pool}-{i:05d}", np.ascontiguousarray(images[i]), int(labels[i]))

    def fingerprint(self) -> dict:
        return _file_fingerprint(self.path)


# ---------------------------------------------------------------- MNIST idx files
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An idx-format array (uint8 data, any rank), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise SourceError(f"{path}: cannot read: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SourceError(f"{path}: not an idx file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise SourceError(f"{path}: idx data type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise SourceError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


class MnistSource(Source):
    """MNIST (or Fashion-MNIST) idx files in a directory: train-/t10k- images and labels, .gz or not."""

    name = "mnist"
    classes = [str(i) for i in range(10)]

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SourceError(f"MNIST directory {self.directory} does not exist")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _find(self, stem: str) -> Path:
        for candidate in (self.directory / stem, self.directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        raise SourceError(f"MNIST file {stem}[.gz] not found in {self.directory}")

    def _pool(self, pool: str) -> tuple[np.ndarray, np.ndarray]:
        if pool not in self._arrays:
            img_path, lbl_path = (self._find(s) for s in _MNIST_FILES[pool])
            images, labels = read_idx(img_path), read_idx(lbl_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise SourceError(f"{img_path} and {lbl_path}: expected (N, H, W) images and N labels, got {images.shape} and {labels.shape}")
            self._arrays[pool] = (images, labels)
        return self._arrays[pool]

    def pool_size(self, pool: str) -> int:
        return len(self._pool(pool)[1])

    def record(self, pool: str, i: int) -> Record:
        images, labels = self._pool(pool)
        return Record(f"mnist-{pool}-{i:05d}", images[i][..., None], int(labels[i]))

    def fingerprint(self) -> dict:
        return {pool: [_file_fingerprint(self._find(stem)) for stem in _MNIST_FILES[pool]] for pool in POOLS}


# ---------------------------------------------------------------- image folder (CelebA, …)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


_EXACT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA"}  # 8 bits per channel: converting to L/RGB keeps the values


def _check_8bit(img, path: Path) -> None:
    """Refuse images whose conversion to 8-bit L/RGB would change pixel values without a stated rule: 16-bit and 32-bit
    integer or float modes (PIL would clip them at 255) and CMYK/YCbCr/LAB, and transparency other than fully opaque."""
    if img.mode not in _EXACT_MODES:
        raise SourceError(f"{path}: image mode {img.mode} (not 8 bits per channel RGB or grey); converting it would clip or "
                          "re-map its values — convert the folder to 8-bit PNG/JPEG first")
    if not (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):  # no alpha channel, no palette/colour key (tRNS)
        return
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else img.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] < 255:
        raise SourceError(f"{path}: has transparent pixels; dropping the alpha channel would change the image — flatten it "
                          "onto a background first")


class ImageFolderSource(Source):
    """A directory tree of PNG/JPEG files; labels from first-level sub-folders when every image is in one.

    ``crop`` takes a centred square of that size, ``resize`` scales to a square (CelebA in NCSN: 140, 64).
    The test pool is a fixed ``test_fraction`` of files chosen by a hash of their relative path; the validation split,
    ``validation_fraction`` of the rest, drawn uniformly (seeded).
    """

    name = "image-folder"

    @property
    def split_rule(self) -> str:
        return f"{self.test_fraction:.0%} of files held out, chosen by the SHA-256 of their relative path"

    def __init__(self, root: str | os.PathLike, crop: int | None = None, resize: int | None = None,
                 channels: int = 3, test_fraction: float = 0.1, validation_fraction: float = 0.1):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"image folder {self.root} does not exist")
        if channels not in (1, 3):
            raise SourceError(f"channels must be 1 or 3, got {channels}")
        for name, fraction in (("test_fraction", test_fraction), ("validation_fraction", validation_fraction)):
            if not 0 <= fraction < 1:
                raise SourceError(f"{name} must be in [0, 1), got {fraction}")
        self.crop, self.resize, self.channels = crop, resize, channels
        self.test_fraction, self.validation_fraction = test_fraction, validation_fraction
        files = sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SourceError(f"image folder {self.root} holds no .png/.jpg/.jpeg files")
        labelled = all(len(f.parts) >= 2 for f in files)
        self.classes = sorted({f.parts[0] for f in files}) if labelled else None
        self._files = {pool: [f for f in files if self._pool_of(f) == pool] for pool in POOLS}

    def _pool_of(self, rel: Path) -> str:
        h = int.from_bytes(hashlib.sha256(rel.as_posix().encode()).digest()[:8], "big") / 2**64
        return "test" if h < self.test_fraction else "train"

    def pool_size(self, pool: str) -> int:
        return len(self._files[pool])

    def record(self, pool: str, i: int) -> Record:
        rel = self._files[pool][i]
        key = "img-" + hashlib.sha1(rel.as_posix().encode()).hexdigest()[:16]
        return Record(key, self.load(rel), self.classes.index(rel.parts[0]) if self.classes else None)

    def check_size(self, size: int) -> None:
        """A SourceError naming the first image that is not ``size`` × ``size``, read from the file headers only (before
        any pixel is decoded; a decompression bomb is refused here too)."""
        for rel in sorted(f for files in self._files.values() for f in files):
            path = self.root / rel
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                raise SourceError(f"{path}: not a readable image: {err}") from None
            if (width, height) != (size, size):
                raise SourceError(f"{path}: {width}×{height} pixels, the reference's images are {size}×{size}; resize them first")

    def load(self, rel: Path) -> np.ndarray:
        path = self.root / rel
        try:
            with Image.open(path) as img:
                _check_8bit(img, path)
                img = img.convert("L" if self.channels == 1 else "RGB")
                if self.crop:
                    w, h = img.size
                    if self.crop > min(w, h):
                        raise SourceError(f"{path}: crop {self.crop} is larger than the image ({w}×{h})")
                    left, top = (w - self.crop) // 2, (h - self.crop) // 2
                    img = img.crop((left, top, left + self.crop, top + self.crop))
                if self.resize:
                    img = img.resize((self.resize, self.resize), Image.BICUBIC)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise SourceError(f"{path}: not a readable image: {err}") from None
        return arr[..., None] if arr.ndim == 2 else arr

    def fingerprint(self) -> dict:
        listing = hashlib.sha256()
        for pool in POOLS:
            for rel in self._files[pool]:
                st = (self.root / rel).stat()
                listing.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"root": str(self.root.resolve()), "listing_sha256": listing.hexdigest(), "crop": self.crop, "resize": self.resize,
                "channels": self.channels, "test_fraction": self.test_fraction, "validation_fraction": self.validation_fraction}


# ---------------------------------------------------------------- factory
SOURCE_NAMES = ("digits", "cifar10", "mnist", "image-folder")


def download_with_torchvision(name: str, cache_dir: str | os.PathLike) -> Path:
    """Fetch CIFAR-10 or MNIST through torchvision into ``cache_dir`` (needs internet); returns the input path."""
    import torchvision  # optional: only for --download, which needs internet

    cache = Path(cache_dir)
    if name == "cifar10":
        torchvision.datasets.CIFAR10(str(cache), train=True, download=True)
        return cache / "cifar-10-python.tar.gz"
    if name == "mnist":
        torchvision.datasets.MNIST(str(cache), train=True, download=True)
        return cache / "MNIST" / "raw"
    raise SourceError(f"only cifar10 and mnist can be downloaded, not {name!r}")


def open_source(name: str, path: str | os.PathLike | None = None, **options) -> Source:
    """The Source called ``name`` reading ``path`` (not needed for digits)."""
    if name not in SOURCE_NAMES:
        raise SourceError(f"unknown source {name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    if name == "digits":
        return DigitsSource()
    if path is None:
        raise SourceError(f"source {name!r} needs --input PATH")
    if name == "cifar10":
        return Cifar10Source(path)
    if name == "mnist":
        return MnistSource(path)
    return ImageFolderSource(path, **options)
