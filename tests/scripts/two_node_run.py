"""Run by tests/test_pipeline_run.py in its own process: `run_pipeline` on a Ray cluster of ray.cluster_utils
(127.0.0.1) of two nodes of 1 CPU, with the config's settings given as `--set`-style arguments (shards and Ray Train
storage on S3, the test's server, through AWS_*). Prints one JSON line: RESULT {metrics, the nodes the workers ran on,
the training run's MLflow metric keys}.

Usage: two_node_run.py CONFIG SHARDS KEY=VALUE ..."""
import json
import sys

import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pipelines.config import load_config
from pipelines.run import run_pipeline

config, shards, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
ray.init(address=cluster.address, log_to_driver=False)
try:
    result = run_pipeline(load_config(config, overrides), shards, progress=False)
    actors = list_actors(limit=1000)
    print("RESULT " + json.dumps({"metrics": result.metrics,
                                  "nodes": {name: sorted({a.node_id for a in actors if a.class_name == name})
                                            for name in ("RayTrainWorker", "SamplingActor")},
                                  "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                                  "logged": sorted(MlflowClient(result.tracking_uri).get_run(result.train_run_id).data.metrics)}))
finally:
    ray.shutdown()
    cluster.shutdown()
