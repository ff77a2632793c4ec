"""Object storage (issue 12): shards streamed from an S3-compatible server that the test starts on 127.0.0.1 (moto's
standalone server), reached through exactly the client code a user's run uses (s3fs via fsspec, configured by
AWS_ENDPOINT_URL and the AWS credential variables); its failures are one line naming the object."""
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from data_prep.loader import make_loader
from data_prep.shard import ShardError, ShardOptions, load_manifest, shard_dataset, verify_shards
from data_prep.storage import StorageError
from pipelines.config import ConfigError
from pipelines.train import check_storage_url
from tests.servers import S3Server, clear_fsspec_instances, free_port

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _upload(local: str, url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    for f in Path(local).rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")
    return url


def _batches(location: str, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(location, 32, seed=3, **kw)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world_size=2, num_workers=2), dict(resampled=True, batches_per_epoch=6, num_workers=2)],
                         ids=["one-pass", "rank-1-of-2-two-workers", "resampled"])
def test_the_loader_streams_shards_from_s3_as_from_local_files(digits_shards, s3_server, kw):
    url = _upload(digits_shards, "s3://ncsn-test/loader/digits")
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
    url = _upload(digits_shards, "s3://ncsn-test/broken/digits")
    fs, base = fsspec.core.url_to_fs(url)
    shards = load_manifest(url)["splits"]["train"]["shards"]

    # a truncated object: --verify names it; the loader skips what it cannot read and counts it
    data = fs.cat_file(f"{base}/{shards[1]['path']}")
    fs.pipe_file(f"{base}/{shards[1]['path']}", data[: len(data) // 2 + 100])
    assert [p.split(":")[0] for p in verify_shards(url)] == [shards[1]["path"]]
    loader = make_loader(url, 32, resampled=True, batches_per_epoch=40, seed=1)
    assert len(list(loader)) == 40 and loader.skipped >= 1

    # a missing object: named by its URL, before any batch
    fs.rm_file(f"{base}/{shards[0]['path']}")
    with pytest.raises(ShardError, match=f"missing, e.g. {url}/{shards[0]['path']}$"):
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
        with pytest.raises(StorageError, match="^access to s3://ncsn-test/ray was refused"):
            check_storage_url("s3://ncsn-test/ray")
    finally:
        refusing.stop()
        monkeypatch.undo()
        clear_fsspec_instances()


def _pipeline_on(nodes: int, shards: str, storage: str, run_dir: Path) -> dict:
    from tests.servers import only_ray_instance

    script = Path(__file__).parent / "scripts" / "two_node_run.py"
    with only_ray_instance():
        out = subprocess.run([sys.executable, str(script), str(CONFIGS), shards, storage, str(run_dir), str(nodes)],
                             capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1],
                             env={**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # MLflow's own setting
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_run_on_two_nodes_with_s3_equals_the_run_on_local_files(digits_shards, s3_server, tmp_path):
    # Shards and Ray Train's checkpoints on S3, the training workers (one per node) and the sampling actors spread over
    # two nodes, evaluation in a Ray task: the same metrics as one node on local files with the same seeds.
    url = _upload(digits_shards, f"s3://ncsn-test/{tmp_path.name}/shards")
    remote = _pipeline_on(2, url, f"s3://ncsn-test/{tmp_path.name}/ray", tmp_path / "s3-run")
    local = _pipeline_on(1, digits_shards, str(tmp_path / "ray"), tmp_path / "local-run")
    assert len(remote["cluster_nodes"]) == 2 and remote["nodes"]["RayTrainWorker"] == remote["cluster_nodes"]  # one per node
    assert remote["nodes"]["Sampler"] == remote["cluster_nodes"]
    # System metrics come from the first worker of each host (Ray Train's local ranks group workers by node IP): both of
    # these Ray nodes are 127.0.0.1, one host, so one monitor and no per-node prefix (system/node<N>/… needs two hosts).
    system = [key for key in remote["logged"] if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and not [key for key in system if key.startswith("system/node")], system
    fs, base = fsspec.core.url_to_fs(f"s3://ncsn-test/{tmp_path.name}/ray/digits")
    assert any(p.endswith("checkpoint.pt") for p in fs.find(base))  # the checkpoints went to the bucket
    assert set(remote["metrics"]) == set(local["metrics"]) >= {"fid_classifier", "kid_classifier", "final_loss"}
    for key, value in local["metrics"].items():
        assert remote["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
