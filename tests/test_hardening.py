"""Hardening (issue 18): nothing unpickles a file a user or another tenant can write, no path from a manifest leaves
its shard folder, restarts recover from their own partial writes, and a failed write leaves nothing behind."""
import errno
import json
import os
import re
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


def _shard_digits(out: Path):
    from data_prep.shard import ShardOptions, shard_dataset

    return shard_dataset(ShardOptions("digits", shard_size=600), str(out), progress=False)


def test_manifest_paths_outside_the_shard_folder_are_never_read_or_removed(tmp_path, ray_local):
    from data_prep.loader import make_loader
    from data_prep.shard import ShardError, load_manifest, verify_shards

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "data" / "shards"
    _shard_digits(out)
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for bad in ("../../victim.txt", str(victim), "train/../../../victim.txt", "./train/x.tar"):
        manifest["splits"]["train"]["shards"][0]["path"] = bad
        manifest_file.write_text(json.dumps(manifest))
        expected = f"{out}/manifest.json: split train: shard path {bad!r} is not a relative path inside the shard folder"
        for read in (load_manifest, verify_shards, lambda s: make_loader(s, 8)):
            with pytest.raises(ShardError, match=re.escape(expected)):
                read(str(out))
    manifest["splits"]["train"]["shards"][0]["path"] = "../../victim.txt"
    manifest["fingerprint"] = "other options"  # a re-run rewrites and removes the old manifest's stale shards
    manifest_file.write_text(json.dumps(manifest))
    summary = _shard_digits(out)
    assert not summary.up_to_date and victim.read_text() == "keep me"
    assert verify_shards(str(out)) == []


def test_a_shard_changed_in_place_is_not_up_to_date(tmp_path, ray_local):
    out = tmp_path / "shards"
    _shard_digits(out)
    shard = sorted((out / "train").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    again = _shard_digits(out)
    assert not again.up_to_date
    from data_prep.shard import verify_shards

    assert verify_shards(str(out)) == []
