"""The pipeline on two hosts that share no network stack and no disk (tests/hosts.py: network and mount namespaces
joined by a bridge, as two VMs on one LAN), with the object store and the MLflow server on that LAN: the run equals
the one-host run, its rendezvous listens on rank 0's host address only, each host reports its own system metrics,
and training survives the loss of the worker host. Started once per module; needs root (else skipped, naming why)."""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.hosts import BIN, LAN_ADDRESS, ROOT, Lan, namespaces_unavailable
from tests.runs import run_args

REASON = namespaces_unavailable()
pytestmark = [pytest.mark.cluster] + ([pytest.mark.skip(reason=REASON)] if REASON else [])

S3, MLFLOW = f"http://{LAN_ADDRESS}:9000", f"http://{LAN_ADDRESS}:5000"
BUCKET = "s3://ncsn-hosts"
RAY_WORKER_PORTS = (10002, 19999)  # Ray's default range, given explicitly
# the Ray settings of the head: a lost raylet is declared dead after 3 missed health checks 1 s apart (Ray's default
# waits about 15 s), so the lost-host test's wait is short
HEAD_SETTINGS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000"}

_PROBE = """
import json, sys, time, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]):
    assert time.time() < deadline, ray.nodes()
    time.sleep(0.5)
address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
actors = list_actors(limit=10000, detail=True)
print(json.dumps({"alive": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
                  "hosts": {name: sorted({address[a.node_id] for a in actors if a.class_name == name})
                            for name in ("RayTrainWorker", "SamplingActor")}}))
"""

_LAN_SETUP = """
import socket, sys, time, boto3
from tests.servers import upload_tree
deadline = time.time() + 120
s3 = boto3.client("s3")
while True:
    try:
        s3.create_bucket(Bucket=sys.argv[1].removeprefix("s3://"))
        break
    except Exception:
        assert time.time() < deadline, "the S3 server did not answer"
        time.sleep(0.3)
upload_tree(sys.argv[2], sys.argv[1] + "/shards")
while True:
    try:
        socket.create_connection((sys.argv[3], int(sys.argv[4])), timeout=2).close()
        break
    except OSError:
        assert time.time() < deadline, "the MLflow server did not accept connections"
        time.sleep(0.3)
"""


class TwoHosts:
    """The running cluster: the lan, each host's environment (token, store and tracking server), where things are."""

    def __init__(self, lan: Lan, env: dict[str, str], tmp: Path):
        self.lan, self.env, self.tmp = lan, env, tmp
        self.head, self.worker = lan.hosts
        self.ray_address = f"{self.head.address}:6379"

    def start_ray(self, host) -> None:
        if host is self.head:
            argv = ["ray", "start", "--head", "--port", "6379", "--dashboard-host", host.address, "--dashboard-port", "8265"]
            env = {**self.env, **HEAD_SETTINGS}
        else:
            argv, env = ["ray", "start", "--address", self.ray_address], self.env
        host.popen([str(BIN / argv[0]), *argv[1:], "--block", "--node-ip-address", host.address, "--num-cpus", "1",
                    "--object-store-memory", "150000000", "--disable-usage-stats",
                    "--min-worker-port", str(RAY_WORKER_PORTS[0]), "--max-worker-port", str(RAY_WORKER_PORTS[1])], env, self.tmp / f"ray-{host.name}.log")

    def probe(self, nodes: int = 2) -> dict:
        """Waits until ``nodes`` nodes are alive; the live hosts and the hosts each actor class ran on."""
        out = self.head.run([str(BIN / "python"), "-c", _PROBE, self.ray_address, str(nodes)], self.env, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def tracking(self) -> MlflowClient:
        """The tracking server's store, read from its disk (the test itself is on no host)."""
        return MlflowClient(f"sqlite:///{self.tmp / 'mlflow' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, pipeline_job, eval_cache):
    tmp = tmp_path_factory.mktemp("hosts")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               AWS_ENDPOINT_URL=S3, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    with Lan(2) as lan:
        lan.service([str(BIN / "moto_server"), "-H", LAN_ADDRESS, "-p", "9000"], env, tmp / "moto.log")
        (tmp / "mlflow").mkdir()
        lan.service([str(BIN / "mlflow"), "server", "--host", LAN_ADDRESS, "--port", "5000", "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}", "--artifacts-destination",
                     str(tmp / "mlflow" / "artifacts")], {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp / "mlflow.log")
        setup = lan.in_lan([str(BIN / "python"), "-c", _LAN_SETUP, BUCKET, str(pipeline_job["run_dir"] / "shards" / "digits"), LAN_ADDRESS, "5000"],
                           {**env, "PYTHONPATH": str(ROOT)}, timeout=180)
        assert setup.returncode == 0, setup.stderr[-3000:] + (tmp / "mlflow.log").read_text()[-2000:]
        cluster = TwoHosts(lan, env, tmp)
        for host in lan.hosts:  # each host's own copy of the evaluation cache
            host.copy_in(eval_cache, "eval_cache")
        cluster.start_ray(cluster.head)
        cluster.start_ray(cluster.worker)
        cluster.probe()
        yield cluster


def _command(pid: int) -> bytes:
    """A process's command line, or b"" once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _train_listeners(host) -> set[str]:
    """The addresses on which a Ray Train worker process of ``host`` listens, as ss shows them inside the host."""
    workers = {pid for pid in host.pids() if b"RayTrainWorker" in _command(pid)}
    out = host.run(["ss", "-Hltnp"], os.environ, timeout=30).stdout
    return {line.split()[3] for line in out.splitlines() if workers & {int(p) for p in re.findall(r"pid=(\d+)", line)}}


def test_the_pipeline_on_two_hosts_equals_the_one_host_run(hosts, pipeline_job):
    # `ncsn-pipeline run` submitted from the head host: shards and Ray Train's storage in the bucket, tracking on the
    # server, each host's run directory and evaluation cache on its own disk. Same seeds as the one-host run.
    run = run_args("/tmp/run", "/tmp/eval_cache", f"data.shards={BUCKET}/shards", f"cluster.storage_path={BUCKET}/ray",
                   f"tracking.tracking_uri={MLFLOW}", "tracking.system_metrics=true")
    submit = hosts.head.popen([str(BIN / "ray"), "job", "submit", "--address", f"http://{hosts.head.address}:8265",
                               "--working-dir", str(ROOT), "--", *run], hosts.env, hosts.tmp / "job.log")
    seen: dict[str, set[str]] = {h.name: set() for h in hosts.lan.hosts}
    while submit.poll() is None:
        for host in hosts.lan.hosts:
            seen[host.name] |= _train_listeners(host)
        time.sleep(0.3)
    log = (hosts.tmp / "job.log").read_text()
    assert submit.returncode == 0 and "succeeded" in log, log[-4000:]
    probe = hosts.probe()
    assert probe["hosts"] == {"RayTrainWorker": [h.address for h in hosts.lan.hosts],
                              "SamplingActor": [h.address for h in hosts.lan.hosts]}, probe
    # the process group's own listeners (rank 0's store, each rank's Gloo pairs) are on the host's Ray address only: not
    # on every interface (torch's default), not on loopback (unreachable from the other host); the wildcard ones are Ray's
    # own core-worker servers, in its worker port range
    ours = {h.name: {a for a in seen[h.name] if not RAY_WORKER_PORTS[0] <= int(a.rsplit(":", 1)[1]) <= RAY_WORKER_PORTS[1]}
            for h in hosts.lan.hosts}
    assert all(a.rsplit(":", 1)[0] == h.address for h in hosts.lan.hosts for a in ours[h.name]), seen
    assert sum(map(len, ours.values())) >= 3 and all(ours.values()), seen  # the store, and a Gloo listener per rank
    summary = json.loads(hosts.head.disk("run/summary.json").read_text())
    local = {k: v for k, v in json.loads((pipeline_job["run_dir"] / "summary.json").read_text()).items() if k not in ("evaluation", "checkpoint")}
    timing = [k for k in local if k.endswith("_per_s")]
    assert set(summary) - {"evaluation", "checkpoint"} == set(local)
    for key in set(local) - set(timing):
        assert summary[key] == pytest.approx(local[key], rel=1e-5, abs=1e-8), key
    client = hosts.tracking()
    experiment = client.get_experiment_by_name("ncsn").experiment_id
    (train,) = client.search_runs([experiment], "attributes.run_name = 'digits'")
    system = sorted({k.split("/")[1] for k in train.data.metrics if k.startswith("system/")})
    assert system == ["node0", "node1"], sorted(train.data.metrics)


def test_a_tracking_file_on_two_hosts_is_refused_before_any_work(hosts):
    # The default tracking store, sqlite in the run directory, is on the head host's disk only: workers on the other
    # host would log to a file of their own. One line, exit 1, before the parent run is opened.
    run = run_args("/tmp/refused", "/tmp/eval_cache", f"data.shards={BUCKET}/shards", f"cluster.storage_path={BUCKET}/refused")
    out = hosts.head.run([str(BIN / "ray"), "job", "submit", "--address", f"http://{hosts.head.address}:8265", "--working-dir",
                          str(ROOT), "--", *run], hosts.env, timeout=300)
    assert out.returncode != 0, out.stdout[-3000:]
    errors = [line for line in out.stdout.splitlines() if line.startswith("ncsn-pipeline run: error:")]
    assert errors and set(errors) == {"ncsn-pipeline run: error: tracking.tracking_uri 'sqlite:////tmp/refused/mlflow.db' is a file on this host, "
                      f"but the Ray cluster spans 2 hosts ({hosts.head.address}, {hosts.worker.address}), whose workers log to "
                      "it too; run an MLflow server (`mlflow server`) and set tracking.tracking_uri to its http:// address, or "
                      "set cluster.shared_filesystem: true if the path is mounted on every node"}, out.stdout[-3000:]  # (the job's log twice)
    assert not hosts.head.disk("refused/mlflow.db").exists()


_ALIVE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("ALIVE " + json.dumps(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
"""


def _alive(hosts: TwoHosts) -> list[str]:
    """The addresses of the nodes Ray counts alive, asked from the head host (Ray's own log lines may come first)."""
    out = hosts.head.run([str(BIN / "python"), "-c", _ALIVE, hosts.ray_address], hosts.env).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("ALIVE "))[len("ALIVE "):])


def _raylet_running(host) -> bool:
    return any(b"raylet" in _command(pid).split(b"\0")[0] for pid in host.pids())


def test_training_survives_a_partition_and_then_the_loss_of_the_worker_host_with_each_step_once(hosts):
    # One training run, two faults of the worker host, each once a checkpoint is in the bucket and steps were logged
    # past it. First a partition: its cable pulled until Ray declares its node dead (its processes live on); reconnected,
    # its raylet learns it was declared dead and exits, its worker with it, so nothing the cut-off worker still held is
    # used. Then the host itself is lost: every process of it killed at once (a VM dies). Each time Ray Train waits for
    # two workers' resources; the host's Ray is started again (as systemd or KubeRay does), and the worker group restarts
    # from the bucket's latest checkpoint on both hosts. Steps after a checkpoint run twice but are logged once.
    from ncsn.checkpoint import load_checkpoint

    settings = ["name=faults", "run_dir=/tmp/faults", f"data.shards={BUCKET}/shards", f"cluster.storage_path={BUCKET}/ray",
                f"tracking.tracking_uri={MLFLOW}", "train.steps=90", "train.batch_size=32", "train.log_every=5",
                "train.checkpoint_every=10", "train.sample_every=1000", "cluster.num_workers=2", "data.loader_workers=0",
                "tracking.system_metrics=false", "sampling.steps_per_level=1", "evaluation.checkpoint_samples=0"]
    train = ["ncsn-pipeline", "train", "--config", "configs/digits.yaml", "--no-progress", *[a for s in settings for a in ("--set", s)]]
    log = hosts.tmp / "faults.log"
    submit = hosts.head.popen([str(BIN / "ray"), "job", "submit", "--address", f"http://{hosts.head.address}:8265",
                               "--working-dir", str(ROOT), "--", *train], hosts.env, log)
    client = hosts.tracking()

    def run():
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'faults'")
        return runs[0] if runs else None

    def logged_steps() -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run().info.run_id, "loss")) if run() else []

    def wait_for_step(step: int, restored: int = 0) -> None:
        deadline = time.monotonic() + 300
        while max(logged_steps(), default=0) < step or int(run().data.tags.get("restored_from_step", 0)) < restored:
            assert submit.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)

    wait_for_step(25)  # checkpoints of steps 10 and 20 registered by then
    hosts.lan.cut(hosts.worker)
    deadline = time.monotonic() + 60
    while _alive(hosts) != [hosts.head.address]:
        assert time.monotonic() < deadline, "the cut-off node was not declared dead"
    assert _raylet_running(hosts.worker)  # cut off, not dead
    hosts.lan.plug(hosts.worker)
    deadline = time.monotonic() + 60
    while _raylet_running(hosts.worker):
        assert time.monotonic() < deadline, "the reconnected raylet, declared dead, did not exit"
        time.sleep(0.5)
    hosts.worker.power_off()  # what is left of the host's Ray (`ray start --block`), as its supervisor would
    hosts.start_ray(hosts.worker)
    wait_for_step(55, restored=10)  # restored from the bucket, then checkpoints after the restore registered
    first = int(run().data.tags["restored_from_step"])
    assert hosts.worker.power_off() and not hosts.worker.pids()  # the host is lost
    hosts.start_ray(hosts.worker)
    submit.wait(600)
    assert submit.returncode == 0 and "succeeded" in log.read_text(), log.read_text()[-4000:]
    assert logged_steps() == list(range(5, 95, 5))  # replayed steps logged once
    second = int(run().data.tags["restored_from_step"])
    assert 10 <= first < second < 90 and second >= 40 and first % 10 == second % 10 == 0, (first, second)  # each from a checkpoint
    assert load_checkpoint(hosts.head.disk("faults/model/checkpoint.pt")).step == 90
    # rank 0's own record on the host it finished on: each step once (replayed ones dropped at the restore); when a
    # restart put rank 0 on the other host, that host's file starts after the restored step
    records = [[json.loads(line)["step"] for line in h.disk("faults/metrics.jsonl").read_text().splitlines()]
               for h in hosts.lan.hosts if h.disk("faults/metrics.jsonl").exists()]
    (last,) = [steps for steps in records if steps[-1] == 90]
    assert last == sorted(set(last)), records
    assert hosts.probe()["alive"] == [hosts.head.address, hosts.worker.address]


def test_sampling_survives_the_loss_of_the_worker_host_with_exactly_n_images(hosts, pipeline_job):
    # `ncsn-pipeline sample` on both hosts (one actor each), the worker host lost once the first chunk is on the head's disk
    # and brought back: Ray restarts its actor there and retries the chunk it held. The driver writes every chunk, so the
    # set is exactly the 40 images of seed 3, each chunk once, equal to the same chunks sampled here without Ray.
    import numpy as np

    from pipelines.sample import SamplingActor, SamplingOptions, Weights, load_samples, open_checkpoint, plan_chunks, resolve_options

    hosts.head.copy_in(pipeline_job["run_dir"] / "model", "sampling-model")
    log = hosts.tmp / "sampling.log"
    submit = hosts.head.popen([str(BIN / "ray"), "job", "submit", "--address", f"http://{hosts.head.address}:8265", "--working-dir",
                               str(ROOT), "--", "ncsn-pipeline", "sample", "--checkpoint", "/tmp/sampling-model/checkpoint.pt",
                               "--output", "/tmp/sampled", "--num-samples", "40", "--seed", "3", "--chunk-size", "4",
                               "--steps-per-level", "10", "--workers", "2", "--no-mlflow", "--no-progress"], hosts.env, log)
    chunks = hosts.head.disk("sampled/chunks")
    deadline = time.monotonic() + 300
    while not any(chunks.glob("chunk_*.npz")):
        assert submit.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    assert hosts.worker.power_off()
    done_when_lost = len(list(chunks.glob("chunk_*.npz")))
    hosts.start_ray(hosts.worker)
    submit.wait(600)
    assert submit.returncode == 0 and "succeeded" in log.read_text(), log.read_text()[-4000:]
    assert done_when_lost < 10  # lost mid-run
    assert len(list(chunks.glob("chunk_*.npz"))) == 10 and len(list(hosts.head.disk("sampled/images").glob("*.png"))) == 40
    source = open_checkpoint(pipeline_job["run_dir"] / "model" / "checkpoint.pt")
    settings = resolve_options(source.checkpoint, SamplingOptions(num_samples=40, seed=3, chunk_size=4, steps_per_level=10))
    actor, weights = SamplingActor(), Weights(source.payload)
    expected = np.concatenate([actor.sample_chunk(weights, settings, *chunk).images for chunk in plan_chunks(40, 4)])
    got = load_samples(hosts.head.disk("sampled"))
    # uint8 images: another process may round a pixel on the boundary the other way, never a whole image
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1
    assert hosts.probe()["alive"] == [hosts.head.address, hosts.worker.address]
