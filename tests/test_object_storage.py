"""Object storage: shards streamed from an S3-compatible server that the test starts on 127.0.0.1 (moto's
standalone server), reached through exactly the client code a user's run uses (s3fs via fsspec, configured by
AWS_ENDPOINT_URL and the AWS credential variables); its failures are one line naming the object. The whole pipeline
on two nodes with S3 is in test_pipeline_run.py."""
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from PIL import Image

from data_prep.loader import make_loader
from data_prep.manifest import ShardError, load_manifest
from data_prep.shard import ShardOptions, shard_dataset, verify_shards
from data_prep.storage import StorageError
from pipelines.config import ConfigError
from pipelines.train import check_storage_url
from tests.servers import S3Server, clear_fsspec_instances, free_port, upload_tree

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _batches(location: str, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(location, 32, seed=3, **kw)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world_size=2, num_workers=2), dict(resampled=True, batches_per_epoch=6, num_workers=2)],
                         ids=["one-pass", "rank-1-of-2-two-workers", "resampled"])
def test_the_loader_streams_shards_from_s3_as_from_local_files(digits_shards, s3_server, kw):
    url = upload_tree(digits_shards, "s3://ncsn-test/loader/digits")
    local, remote = _batches(digits_shards, **kw), _batches(url, **kw)
    assert len(remote) == len(local) > 0
    for (x, y), (xr, yr) in zip(local, remote):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_the_shard_job_writes_to_s3_and_a_rerun_is_up_to_date(tmp_path, s3_server, ray_local):
    url = "s3://ncsn-test/sharded/digits"
    first = shard_dataset(ShardOptions("digits", shard_size=400), url, progress=False)
    assert not first.up_to_date and first.images == 1797 and verify_shards(url) == []
    assert shard_dataset(ShardOptions("digits", shard_size=400), url, progress=False).up_to_date  # hashes match: nothing to do
    assert len(_batches(url)) > 0


def _one_line(args: list[str]) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "ncsn-pipeline"), *args], capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_object_store_failures_are_one_line_naming_the_object(digits_shards, s3_server, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^cluster.storage_path 's3://ncsn-test/a\[1\]' is not a URI Ray Train can use"):
        check_storage_url("s3://ncsn-test/a[1]")
    with pytest.raises(StorageError, match=r"^cluster.storage_path s3://no-such-bucket/ray: bucket 'no-such-bucket' does not exist"):
        check_storage_url("s3://no-such-bucket/ray")  # Ray Train's controller died inside the job with an 84-line traceback
    check_storage_url("s3://ncsn-test/not-yet-written")  # a prefix that does not exist yet is fine: Ray Train creates it
    url = upload_tree(digits_shards, "s3://ncsn-test/broken/digits")
    fs, base = fsspec.core.url_to_fs(url)
    shards = load_manifest(url).split("train").shards

    # a truncated object: --verify names it, and the loader, hashing the object as it streams it, stops naming it
    data = fs.cat_file(f"{base}/{shards[1].path}")
    fs.pipe_file(f"{base}/{shards[1].path}", data[: len(data) // 2 + 100])
    assert [p.split(":")[0] for p in verify_shards(url)] == [shards[1].path]
    with pytest.raises(ShardError, match=rf"^{url}/{shards[1].path}: its sha256 is [0-9a-f]{{16}}…, the manifest's"):
        list(make_loader(url, 32))

    # a missing object: named by its URL, before any batch
    fs.rm_file(f"{base}/{shards[0].path}")
    with pytest.raises(ShardError, match=f"missing, e.g. {url}/{shards[0].path}$"):
        make_loader(url, 32)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    # an unreachable endpoint
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    clear_fsspec_instances()
    with pytest.raises(StorageError, match=f"^cannot reach endpoint {dead} \\(AWS_ENDPOINT_URL\\) for {url}/manifest.json"):
        load_manifest(url)
    assert _one_line(["train", "--config", str(CONFIGS / "digits.yaml"), "--set", f"data.shards={url}"]).startswith(f"ncsn-pipeline train: error: cannot reach endpoint {dead}")
    with pytest.raises(StorageError, match=f"^cannot reach endpoint {dead} .* for s3://ncsn-test/ray"):  # Ray Train's storage (pyarrow)
        check_storage_url("s3://ncsn-test/ray")

    # refused credentials (a server that checks every request against its IAM, where no key exists)
    refusing = S3Server(tmp_path / "refusing", refuse_credentials=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", refusing.endpoint)
        clear_fsspec_instances()
        with pytest.raises(StorageError, match=f"^access to {url}/manifest.json was refused .*credentials"):
            load_manifest(url)
        assert "was refused" in _one_line(["train", "--config", str(CONFIGS / "digits.yaml"), "--set", f"data.shards={url}"])
        pngs = tmp_path / "pngs"
        pngs.mkdir()
        Image.new("L", (8, 8)).save(pngs / "0.png")
        assert "was refused" in _one_line(["evaluate", "--samples", str(pngs), "--reference", url, "--cache-dir", str(tmp_path / "c")])
        with pytest.raises(StorageError, match="^access to s3://ncsn-test/ray was refused"):
            check_storage_url("s3://ncsn-test/ray")
    finally:
        refusing.stop()
        monkeypatch.undo()
        clear_fsspec_instances()


def test_an_s3_endpoint_that_accepts_and_never_answers_is_one_line_in_bounded_time(tmp_path):
    # Training with shards on such an endpoint printed nothing for 400 s. S3 calls are bounded (data_prep.storage.S3_BOUNDS:
    # 5 attempts of at most 15 s per read, about 75 s); a user's FSSPEC_S3 sets other bounds, here 1 s per read, and the
    # command that reads the manifest first ends in one line naming the endpoint.
    import json
    import os
    import socket
    import time

    from data_prep.storage import S3_BOUNDS

    assert S3_BOUNDS["read_timeout"] * 5 <= 90 and S3_BOUNDS["retries"] == {"total_max_attempts": 1}
    assert fsspec.filesystem("s3", skip_instance_cache=True).config_kwargs["read_timeout"] == S3_BOUNDS["read_timeout"]
    cli = str(Path(sys.executable).parent / "ncsn-pipeline")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint,
               "FSSPEC_S3": json.dumps({"config_kwargs": {**S3_BOUNDS, "connect_timeout": 1, "read_timeout": 1}})}
        t = time.monotonic()
        out = subprocess.run([cli, "train", "--config", config, "--shards", "s3://ncsn-test/hung", "--set", f"run_dir={tmp_path}",
                              "--dry-run"], capture_output=True, text=True, timeout=300, env=env)
        seconds = time.monotonic() - t
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and seconds < 60, (seconds, out.stderr[-2000:])
    assert lines[-1].startswith(f"ncsn-pipeline train: error: cannot reach endpoint {endpoint} (AWS_ENDPOINT_URL) for s3://ncsn-test/hung"), lines[-1]
