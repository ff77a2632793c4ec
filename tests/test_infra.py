"""The deployment files, validated offline (no Kubernetes or cloud here): they parse, carry the fields KubeRay / the
cluster launcher / compose need, pin the same Ray as pyproject.toml, and their pipeline commands load as configs."""
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{package}(\[|=|>|$)", d)]
    return re.search(r"[=>]=([\d.]+)", spec).group(1)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == _pinned("ray")
    head = spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_limits = _containers(groups["gpu"]["template"])[0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert spec["enableInTreeAutoscaling"] is True and groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1
    for template in [head["template"]] + [g["template"] for g in groups.values()]:
        assert "volumes" not in template["spec"]  # no shared volume: object storage
        for container in _containers(template):
            assert container["image"].startswith("ncsn-pipeline:") and "volumeMounts" not in container
            assert {"secretRef": {"name": "ncsn-s3"}} in container["envFrom"]  # the object store's credentials


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests(name):
    doc = yaml.safe_load((INFRA / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        _check_ray_cluster_spec(doc["spec"])
    else:
        # a long job: an explicit submission mode, and rules that never delete a failed run's head before a day has passed
        rules = doc["spec"]["deletionStrategy"]["deletionRules"]
        assert doc["kind"] == "RayJob" and doc["spec"]["submissionMode"] == "K8sJobMode"
        assert "shutdownAfterJobFinishes" not in doc["spec"] and "ttlSecondsAfterFinished" not in doc["spec"]  # rules mode forbids them
        failed = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules if r["condition"].get("jobStatus") == "FAILED"}
        assert failed == {"DeleteWorkers": 0, "DeleteCluster": 86400}
        assert {r["policy"] for r in rules if r["condition"].get("jobStatus") == "SUCCEEDED"} == {"DeleteCluster"}
        assert doc["spec"]["activeDeadlineSeconds"] > 0 and doc["spec"]["backoffLimit"] >= 0
        _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_rayjob_entrypoint_shards_to_and_trains_from_object_storage():
    from pipelines.cli import build_parser

    words = shlex.split(yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())["spec"]["entrypoint"])
    shard, run = [words[:words.index("&&")], words[words.index("&&") + 1:]]
    assert shard[:2] == ["ncsn-pipeline", "shard"] and run[:2] == ["ncsn-pipeline", "run"]
    shard_args, run_args = build_parser().parse_args(shard[1:]), build_parser().parse_args(run[1:])  # valid options
    cfg = load_config(ROOT / run_args.config, run_args.set)  # every key exists and every value is valid
    assert cfg.data.shards == shard_args.output and cfg.data.shards.startswith("s3://")
    assert cfg.cluster.storage_path.startswith("s3://") and not cfg.cluster.shared_filesystem


def test_dockerfile_uses_the_pinned_ray_image():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{_pinned('ray')}-py311-${{VARIANT}}"
    for path in re.findall(r"^COPY --chown=\S+ (\S+)", text, re.M):
        assert (ROOT / path).exists(), path


def test_cluster_launcher_config():
    doc = yaml.safe_load((INFRA / "cluster" / "cluster.yaml").read_text())
    assert doc["head_node_type"] in doc["available_node_types"]
    assert {"cluster_name", "provider", "docker", "head_start_ray_commands", "worker_start_ray_commands"} <= set(doc)
    assert doc["docker"]["image"].startswith("ncsn-pipeline:")
    assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])


def test_compose_mlflow_server_is_loopback_bound_with_postgres_and_allowed_hosts():
    doc = yaml.safe_load((INFRA / "compose.yaml").read_text())
    mlflow, postgres = doc["services"]["mlflow"], doc["services"]["postgres"]
    assert mlflow["ports"] == ["127.0.0.1:5000:5000"] and "ports" not in postgres
    assert "--backend-store-uri postgresql://" in mlflow["command"] and "--artifacts-destination" in mlflow["command"]
    assert re.search(r"--allowed-hosts \S*127\.0\.0\.1", mlflow["command"])
    version = mlflow["image"].rsplit(":v", 1)[1]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, _pinned("mlflow").split(".")))


def test_local_cluster_script_is_valid_bash_and_loopback_only():
    script = INFRA / "local-cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "0.0.0.0" not in text and "--node-ip-address 127.0.0.1 --port 6380 --dashboard-host 127.0.0.1" in text
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 2  # usage error without up|down


@pytest.mark.cluster
def test_local_cluster_down_stops_its_own_head_and_no_other_ray(tmp_path):
    # (Ray's Unix sockets need short paths: the temp dirs are directly under /tmp)
    # Another Ray of the same user (a head in a temp dir of its own) keeps running when the script's head is stopped.
    import os
    import shutil
    import sys
    import tempfile
    import time

    import psutil

    from tests.servers import free_port

    def processes(marker: str) -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]

    short = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))
    env = {**os.environ, "NCSN_LOCAL_CLUSTER_STATE": str(tmp_path / "state"), "TMPDIR": str(short)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    other = short / "other"
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--include-dashboard",
                    "false", "--temp-dir", str(other), "--num-cpus", "1"], check=True, capture_output=True, env=env, timeout=120)
    script = str(INFRA / "local-cluster.sh")
    try:
        up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, env=env, timeout=180)
        assert up.returncode == 0, up.stderr[-2000:]
        ours = str(short / f"ncsn-ray-{os.getuid()}") + "/"
        assert processes(ours) and processes(str(other) + "/")
        down = subprocess.run(["bash", script, "down"], capture_output=True, text=True, env=env, timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
        deadline = time.monotonic() + 30
        while processes(ours) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes(ours) and processes(str(other) + "/")  # ours gone, the other head untouched
    finally:
        for p in processes(str(short) + "/"):
            p.kill()
        shutil.rmtree(short, ignore_errors=True)
