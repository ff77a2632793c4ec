"""Hardening (issue 18): nothing unpickles a file a user or another tenant can write, no path from a manifest leaves
its shard folder, restarts recover from their own partial writes, and a failed write leaves nothing behind."""
import errno
import os
from pathlib import Path

import pytest
import torch

from ncsn.atomic import atomic_write
from pipelines.evaluate import EvaluationError, Evaluator


class _Planted:
    """A pickle that, if ever unpickled, creates the file named ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": _Planted(marker)}, path)  # a torch file whose unpickling runs code


def test_planted_pickles_in_the_evaluation_caches_are_never_unpickled(tmp_path, digits_shards):
    marker = tmp_path / "PWNED"
    cache = tmp_path / "cache"
    evaluator = Evaluator(digits_shards, "classifier", cache_dir=cache, kid_subset_size=20)
    samples = evaluator.reference[:40]
    first = evaluator.metrics(samples)
    caches = sorted(evaluator.cache.glob("features-*.pt"))
    assert len(caches) == 1  # the reference features, cached as tensors
    for path in caches + [evaluator.cache / "torch-fidelity" / "fid_stats_test.pt"]:  # ours, and where torch-fidelity's went
        _plant(path, marker)
    again = Evaluator(digits_shards, "classifier", cache_dir=cache, kid_subset_size=20).metrics(samples)
    assert not marker.exists()
    assert again == pytest.approx(first)  # recomputed, not read from the planted file
    reloaded = torch.load(caches[0], weights_only=True)  # and rewritten as plain tensors
    assert all(isinstance(v, torch.Tensor) for v in reloaded.values())


def test_planted_inception_weights_in_the_hub_cache_are_refused(tmp_path, digits_shards, monkeypatch):
    # No --inception-weights: torch-fidelity would take the file torch.hub cached (user-writable) with weights_only=False.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    marker = tmp_path / "PWNED"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _plant(tmp_path / "torch" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1], marker)
    with pytest.raises(EvaluationError, match="cannot load the Inception weights .*--inception-weights PATH"):
        Evaluator(digits_shards, "inception", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_kid_subset_size_below_two_is_refused(digits_shards, tmp_path):
    for bad in (0, 1, -3):
        with pytest.raises(EvaluationError, match=f"kid_subset_size must be an integer >= 2, got {bad}"):
            Evaluator(digits_shards, "classifier", cache_dir=tmp_path, kid_subset_size=bad)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "file.bin"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def disk_full(p: Path) -> None:
        p.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]
