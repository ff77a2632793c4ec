import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.loader import make_loader
from data_prep.manifest import ShardError
from data_prep.shard import ShardOptions, shard_dataset, verify_shards
from data_prep.sources import Cifar10Source, ImageFolderSource, MnistSource, SourceError, open_source
from tests.datasets import write_cifar10_tarball, write_image_folder, write_mnist
from tests.servers import joining_env
from data_prep.loader import _decode_png


def _read_back(out: Path, split: str) -> dict:
    """Every sample of a split read with the webdataset library itself: {key: (pixels HWC, label)}."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["path"]) for s in manifest["splits"][split]["shards"]]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = (_decode_png(sample["png"]), int(sample["cls"]) if "cls" in sample else None)
    return samples


def _assert_exact(out: Path, truth: dict, prefix: str) -> None:
    """Every shard sample equals the source's image (HWC) and label, key by key: the test pool is the test split, the
    training pool the training and validation splits together (disjoint)."""
    for pool, (images, labels) in truth.items():
        parts = [_read_back(out, split) for split in (("train", "validation") if pool == "train" else ("test",))]
        got = {key: sample for part in parts for key, sample in part.items()}
        assert len(got) == sum(len(part) for part in parts) == len(labels)
        for i in range(len(labels)):
            pixels, label = got[f"{prefix}-{pool}-{i:05d}"]
            assert np.array_equal(pixels, images[i]) and label == labels[i]


def test_cifar10_tarball_shards_back_exactly(tmp_path, ray_local):
    truth = write_cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", per_batch=6)
    out = tmp_path / "shards"
    summary = shard_dataset(ShardOptions("cifar10", str(tmp_path / "cifar-10-python.tar.gz"), shard_size=7), str(out), progress=False)
    assert summary.images == 36 and not summary.up_to_date
    _assert_exact(out, truth, "cifar10")
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"]
    assert manifest["image_shape"] == [32, 32, 3] and (splits["train"]["count"], splits["validation"]["count"]) == (27, 3)
    assert [s["count"] for s in splits["train"]["shards"]] == [7, 7, 7, 6] and "uniformly" in manifest["validation_split"]
    train = np.stack([pixels for pixels, _ in _read_back(out, "train").values()])  # the statistics are the training split's
    stats = splits["train"]["statistics"]
    assert stats["channel_mean"] == pytest.approx((train / 255).reshape(-1, 3).mean(0), abs=1e-9)
    flat = train.reshape(27, -1).astype(np.float64) / 255  # exact over all 27 images, blocks of 7
    assert stats["max_pairwise_distance"] == pytest.approx(max(np.linalg.norm(a - b) for a in flat for b in flat), rel=1e-9)


def test_malicious_cifar_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10_tarball(tmp_path / "evil.tar.gz", evil_member="data_batch_2")
    source = Cifar10Source(tmp_path / "evil.tar.gz")
    with pytest.raises(SourceError, match=r"data_batch_2: unsafe or invalid pickle: refusing to load global posix.system"):
        list(source.read("train", 0, 12))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_shards_back_exactly(tmp_path, ray_local, gz):
    truth = write_mnist(tmp_path / "mnist", gz=gz)
    out = tmp_path / "shards"
    shard_dataset(ShardOptions("mnist", str(tmp_path / "mnist"), shard_size=5), str(out), progress=False)
    _assert_exact(out, {split: (images[..., None], labels) for split, (images, labels) in truth.items()}, "mnist")


def test_bad_mnist_file_names_the_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05" * 3 + b"short")
    with pytest.raises(SourceError, match=r"t10k-images-idx3-ubyte: header says shape \(5, 5, 5\)"):
        MnistSource(tmp_path).count("test")


def test_image_folder_shards_back_with_labels_crop_and_resize(tmp_path, ray_local):
    truth = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "shards"
    opts = ShardOptions("image-folder", str(tmp_path / "imgs"), shard_size=4)
    shard_dataset(opts, str(out), progress=False)
    got = list({**_read_back(out, "train"), **_read_back(out, "validation"), **_read_back(out, "test")}.values())
    assert ImageFolderSource(tmp_path / "imgs").classes == ["cats", "dogs"]
    expected = sorted((pixels.tobytes(), ["cats", "dogs"].index(cls)) for pixels, cls in truth.values())
    assert sorted((pixels.tobytes(), label) for pixels, label in got) == expected
    cropped = ImageFolderSource(tmp_path / "imgs", crop=14, resize=8, channels=1)
    rec = next(cropped.read("train", 0, 1))
    assert rec.image.shape == (8, 8, 1)
    with pytest.raises(SourceError, match="crop 40 is larger than the image"):
        next(ImageFolderSource(tmp_path / "imgs", crop=40).read("train", 0, 1))


def test_rerun_is_a_noop_and_changed_option_rewrites(tmp_path, ray_local):
    out = tmp_path / "shards"
    first = shard_dataset(ShardOptions("digits", shard_size=400), str(out), progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    again = shard_dataset(ShardOptions("digits", shard_size=400), str(out), progress=False)
    assert again.up_to_date and "up to date" in again.line() and again.images == first.images == 1797
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    changed = shard_dataset(ShardOptions("digits", shard_size=600), str(out), progress=False)
    assert not changed.up_to_date
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [600, 600, 3]
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == sorted(Path(s["path"]).name for s in manifest["splits"]["train"]["shards"])


def test_verify_reports_a_tampered_shard(tmp_path, ray_local):
    out = tmp_path / "shards"
    shard_dataset(ShardOptions("digits", shard_size=500), str(out), progress=False)
    assert verify_shards(str(out)) == []
    shard = sorted((out / "train").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_shards(str(out))
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]


def test_shard_cli_fails_with_one_line_reason(tmp_path):
    cli = Path(sys.executable).parent / "ncsn-pipeline"
    out = subprocess.run([str(cli), "shard", "--source", "cifar10", "--input", str(tmp_path / "nope.tar.gz"), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"ncsn-pipeline shard: error: CIFAR-10 tarball {tmp_path / 'nope.tar.gz'} does not exist (expected cifar-10-python.tar.gz)"]


def test_shard_cli_digits_summary_line(tmp_path, ray_local):
    cli = Path(sys.executable).parent / "ncsn-pipeline"
    out = subprocess.run([str(cli), "shard", "--source", "digits", "--output", str(tmp_path / "d"), "--workers", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=joining_env())  # the tests' Ray, as on a cluster
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("wrote 1797 images in 4 shards")  # train 1000 + 203, validation 297, test 297
    assert "images/s" in out.stdout


def test_a_failed_shard_job_leaves_no_unhandled_error_of_its_other_tasks(tmp_path, ray_local):
    """A caller that goes on after a failed job (a notebook, `run`) sees the one error, not Ray's "Unhandled error"
    traceback for every sibling task and for the failed task's second return, printed when the references drop."""
    import gc
    import logging
    import time

    from PIL import Image

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    (tmp_path / "cmyk" / "a").mkdir(parents=True)
    for i in range(24):
        Image.fromarray(np.full((8, 8, 4), i, dtype=np.uint8), "CMYK").save(tmp_path / "cmyk" / "a" / f"{i}.jpg")
    kept, ray_logger = Kept(), logging.getLogger("ray")  # Ray's own handler, bound at import, escapes pytest's capture
    ray_logger.addHandler(kept)
    try:
        with pytest.raises(ShardError, match=r"shard task train/\d+ failed: SourceError: .*image mode CMYK"):
            shard_dataset(ShardOptions("image-folder", str(tmp_path / "cmyk"), shard_size=4), str(tmp_path / "out"),
                          workers=4, progress=False)
        gc.collect()
        time.sleep(2)  # Ray reports an unread error as its reference is freed (0.2 s measured)
    finally:
        ray_logger.removeHandler(kept)
    assert not [line for line in kept.lines if "Unhandled error" in line]


# ---------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("digits") / "shards"
    shard_dataset(ShardOptions("digits", shard_size=300), str(out), progress=False)  # train: 300×4 + 3
    return out


def _keys_of(loader) -> list[bytes]:
    return [img.numpy().tobytes() for images, _ in loader for img in images]


def test_two_ranks_see_every_sample_once_with_equal_batches(digit_shards):
    loaders = [make_loader(str(digit_shards), 50, rank=r, world_size=2, num_workers=w) for r, w in ((0, 2), (1, 0))]
    assert len(loaders[0]) == len(loaders[1])
    seen = [_keys_of(ld) for ld in loaders]
    assert len(seen[0]) == len(seen[1]) == len(loaders[0]) * 50
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union)  # nobody sees a sample twice
    # shards of 300, 300, 300, 300 and 3 on 2 ranks: 603 vs 600 samples, 12 batches each; the 3-sample imbalance is dropped.
    assert loaders[0].dropped_per_epoch == 3 and len(loaders[0]) == 12


def test_even_split_covers_the_whole_epoch(tmp_path, ray_local):
    out = tmp_path / "shards"
    shard_dataset(ShardOptions("digits", shard_size=401), str(out), progress=False)  # train 1203 = 3 × 401
    loaders = [make_loader(str(out), 401, rank=r, world_size=3) for r in (0, 1, 2)]
    union = [key for loader in loaders for key in _keys_of(loader)]
    train = [rec.image.tobytes() for rec in open_source("digits").read("train", 0, 2000)]
    assert len(union) == 1203 and set(union) == set(train) and loaders[0].dropped_per_epoch == 0


def test_resampled_loader_gives_equal_epochs_even_with_fewer_shards_than_ranks(digit_shards):
    loaders = [make_loader(str(digit_shards), 64, rank=r, world_size=8, resampled=True, batches_per_epoch=3) for r in (0, 7)]
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == 3 and all(b[0].shape == (64, 1, 8, 8) and b[0].dtype.is_floating_point is False for b in batches)
    with pytest.raises(ShardError, match="5 train shard\\(s\\) cannot feed 8 ranks"):
        make_loader(str(digit_shards), 8, rank=0, world_size=8)


def _rewrite_member(shard: Path, data: bytes) -> None:
    """Replace the first PNG in a tar shard by ``data``."""
    import io

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name == victim:
                payload, m.size = data, len(data)
            tar.addfile(m, io.BytesIO(payload))


def _white_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["replaced", "truncated"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("which", [1, -1])
def test_a_shard_changed_after_sharding_stops_the_loader_naming_it(tmp_path, digit_shards, damage, workers, which):
    # A sample replaced by a valid image (what `shard --verify` catches), or a shard cut short: the stream's sha256 is
    # not the manifest's, and the loader stops with one line naming the shard, in exact and in resampled mode; also the
    # last shard, which one exact pass would end inside (the samples the epoch drops are read, to hash it to its end).
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digit_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["splits"]["train"]["shards"][which]["path"]
    if damage == "replaced":
        _rewrite_member(shard, _white_png())
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = rf"^{shard}: its sha256 is [0-9a-f]{{16}}…, the manifest's [0-9a-f]{{16}}… \(the shard was changed or damaged"
    for buffer in (0, 1000):  # without a shuffle buffer each sample is passed on as soon as it is read (as evaluation reads)
        with pytest.raises(ShardError, match=message):
            list(make_loader(str(out), 50, num_workers=workers, shuffle_buffer=buffer))
    with pytest.raises(ShardError, match=message):
        loader = make_loader(str(out), 50, resampled=True, num_workers=workers, seed=1)
        for _ in range(10):  # endless draws with replacement: the damaged shard comes up
            list(loader)
    assert len(list(make_loader(str(digit_shards), 50, num_workers=workers))) == 24  # the intact set: a whole epoch


def test_the_first_images_of_a_split_are_read_from_its_leading_shards_alone_and_verified(tmp_path, digit_shards):
    # Inpainting's few images: a damaged later shard is never opened; a damaged first shard is still caught.
    import shutil

    from pipelines.evaluate import EvaluationError, read_first, read_split

    first = read_split(str(digit_shards), "train")[0][:8]
    out = tmp_path / "copy"
    shutil.copytree(digit_shards, out)
    shards = [out / s["path"] for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]]
    shards[-1].write_bytes(b"")  # a later shard, emptied
    assert np.array_equal(read_first(str(out), "train", 8), first)
    assert np.array_equal(read_first(str(out), "train", 301)[:8], first)  # the second shard's first image too
    _rewrite_member(shards[0], _white_png())
    with pytest.raises(ShardError, match=rf"^{shards[0]}: its sha256 is"):
        read_first(str(out), "train", 8)
    with pytest.raises(EvaluationError, match="split 'train' holds 1203 images, fewer than the 1204 asked for"):
        read_first(str(digit_shards), "train", 1204)


def test_undecodable_samples_of_an_intact_shard_are_skipped_and_counted(tmp_path, digit_shards):
    # A PNG that does not decode in a shard whose sha256 is the manifest's (the set was written so): skipped, counted.
    import hashlib
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digit_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    _rewrite_member(out / entry["path"], b"this is not a png")
    entry["sha256"] = hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    loader = make_loader(str(out), 50, resampled=False)
    assert len(list(loader)) == len(loader) and loader.skipped == 1


def test_missing_shard_is_a_clear_error(tmp_path, digit_shards):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digit_shards, out)
    victim = sorted((out / "train").glob("*.tar"))[2]
    victim.unlink()
    with pytest.raises(ShardError, match=rf"1 shard file\(s\) listed in .* are missing, e.g. .*{victim.name}"):
        make_loader(str(out), 10)
    with pytest.raises(ShardError, match="no manifest.json"):
        make_loader(str(tmp_path), 10)


def test_max_shard_mb_starts_new_shards_by_size(tmp_path, ray_local):
    out = tmp_path / "shards"
    shard_dataset(ShardOptions("digits", shard_size=1000, max_shard_mb=0.2), str(out), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]["shards"]
    assert sum(s["count"] for s in train) == 1203 and len(train) > 2  # by count alone it would be 2
    assert all(s["bytes"] <= 0.2e6 + 10_000 for s in train)  # the limit, plus at most one sample and the tar trailer
    assert verify_shards(str(out)) == []
