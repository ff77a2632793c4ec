"""Run by tests/test_train_ray.py in its own process: a 2-node Ray cluster on 127.0.0.1 (ray.cluster_utils),
one CPU per node, and a 2-worker training job on it, with system metrics. Prints one JSON line: RESULT {...}."""
import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from pipelines.config import load_config
from pipelines.train import run_training

configs, shards, run_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
ray.init(address=cluster.address)
try:
    cfg = load_config(configs / "digits.yaml", [f"run_dir={run_dir}", "train.steps=10", "train.batch_size=32", "train.log_every=5",
                                                "train.checkpoint_every=10", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
                                                "data.loader_workers=0", "tracking.system_metrics=true"])
    result = run_training(cfg, shards)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    print("RESULT " + json.dumps({"step": result.metrics["step"], "worker_nodes": sorted({a.node_id for a in workers}),
                                  "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                                  "metrics": sorted(MlflowClient(result.run.tracking_uri).get_run(result.run.run_id).data.metrics)}))
finally:
    ray.shutdown()
    cluster.shutdown()
