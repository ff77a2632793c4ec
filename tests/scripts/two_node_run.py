"""Run by tests/test_object_storage.py in its own process: `run_pipeline` on a Ray cluster of ray.cluster_utils
(127.0.0.1), either two nodes of 1 CPU with shards and Ray Train storage on S3 (the test's server, through AWS_*), or
one node of 2 CPUs on local files; MLflow's system metrics on. Prints one JSON line: RESULT {metrics, the nodes the
workers ran on, the training run's MLflow metric keys}."""
import json
import sys
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pipelines.config import load_config
from pipelines.run import run_pipeline

configs, shards, storage, run_dir, nodes = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2 // nodes, "node_ip_address": "127.0.0.1"})
for _ in range(nodes - 1):
    cluster.add_node(num_cpus=2 // nodes, node_ip_address="127.0.0.1")
ray.init(address=cluster.address, log_to_driver=False)
try:
    cfg = load_config(configs / "digits.yaml", [f"run_dir={run_dir}", f"cluster.storage_path={storage}", "train.steps=20",
                                                "train.batch_size=32", "train.log_every=10", "train.checkpoint_every=20",
                                                "train.sample_every=20", "cluster.num_workers=2", "data.loader_workers=0",
                                                "tracking.system_metrics=true", "sampling.num_samples=60", "sampling.chunk_size=30",
                                                "sampling.steps_per_level=2", "sampling.workers=2"])
    result = run_pipeline(cfg, shards, progress=False)
    actors = list_actors(limit=1000)
    print("RESULT " + json.dumps({"metrics": {k: v for k, v in result.metrics.items() if not k.endswith("_per_s")},
                                  "nodes": {name: sorted({a.node_id for a in actors if a.class_name == name})
                                            for name in ("RayTrainWorker", "Sampler")},
                                  "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                                  "logged": sorted(MlflowClient(result.tracking_uri).get_run(result.train_run_id).data.metrics)}))
finally:
    ray.shutdown()
    cluster.shutdown()
