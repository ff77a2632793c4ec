"""Tiny data sets in the official formats, written by the tests themselves."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n uint8 RGB images (N, H, W, 3) of low-frequency noise (bilinear upsampled 4×4 fields plus mild grain): PNG
    compresses them about as it does photographs, and like photographs they vary along few directions."""
    import torch

    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    images = (images + torch.from_numpy(rng.normal(0, 6, images.shape).astype(np.float32))).clamp(0, 255)
    return images.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def write_cifar10_tarball(path: Path, per_batch: int = 6, seed: int = 0, evil_member: str | None = None, smooth: bool = False) -> dict:
    """A cifar-10-python.tar.gz with ``per_batch`` images per batch (uniform random pixels, or ``smooth_images``);
    returns {split: (images NHWC, labels)}."""
    rng = np.random.default_rng(seed)
    truth = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            images = smooth_images(rng, per_batch, 32) if smooth else rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, per_batch).tolist()
            batch = {b"data": images.transpose(0, 3, 1, 2).reshape(per_batch, -1), b"labels": labels, b"batch_label": b"x"}
            payload = pickle.dumps(_Evil() if name == evil_member else batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            split = "test" if name == "test_batch" else "train"
            truth[split][0].append(images)
            truth[split][1].extend(labels)
    return {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in truth.items()}


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict:
    """MNIST idx files (gzipped or not); returns {split: (images NHW, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for suffix, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = _idx(arr)
            target = directory / f"{prefix}-{suffix}{'.gz' if gz else ''}"
            target.write_bytes(gzip.compress(data) if gz else data)
        truth[split] = (images, labels.astype(int))
    return truth


def write_image_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (20, 16), seed: int = 0) -> dict:
    """PNG files in class sub-folders; returns {relative path: (pixels HWC, class name)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
            truth[f"{cls}/{i:03d}.png"] = (arr, cls)
    return truth
