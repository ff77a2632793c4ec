import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when Ray workers run beside the test process.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# No usage telemetry from MLflow in tests (Ray workers inherit this through the local Ray started below).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Ray on Linux advertises the host's network address even for a local instance; this setting (meant for
# single-host Ray on macOS/Windows) keeps every Ray node, worker and client of the tests on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray Train waits 10 minutes for a worker's health check before it counts the worker as lost; the worker-loss tests need
# the restart well inside their own limits (2 minutes, still far above a poll's normal milliseconds).
os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "120")


# The tests' S3-compatible server (tests.servers.S3Server, started on first use) is reached the standard way; set before
# any Ray instance starts, so Ray's workers inherit it too. Fixed test credentials, nothing outside 127.0.0.1.
from tests.servers import free_port  # noqa: E402

S3_PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_var, None)


# Fixtures that start Ray or train the shared digits model: tests using them are left out of `make test-fast`.
CLUSTER_FIXTURES = {"ray_local", "digits_shards", "trained_digits"}


def pytest_collection_modifyitems(config, items):
    """Mark as `cluster` every test that needs a Ray instance or the trained model (by fixture, or marked by hand)."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs), shut down at the end; see tests.servers.start_local_ray."""
    import ray

    from tests.servers import start_local_ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory, ray_local) -> str:
    """The digits data set as shards of 300 images, written once per session."""
    from data_prep.shard import ShardOptions, shard_dataset

    out = tmp_path_factory.mktemp("digits") / "shards"
    shard_dataset(ShardOptions("digits", shard_size=300), str(out), progress=False)
    return str(out)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """The digits NCSN of examples/digits.py (2500 steps, about 2½ minutes), trained once per session.
    Returns (EMA model, schedule, checkpoint path); the checkpoint records ε and T for the sampler."""
    import sys
    from pathlib import Path

    from ncsn.checkpoint import Checkpoint, save_checkpoint
    from ncsn.sigmas import Schedule

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import train_digits

    torch.set_num_threads(2)
    model, schedule = train_digits(seed=0)
    path = tmp_path_factory.mktemp("digits_model") / "checkpoint.pt"
    save_checkpoint(path, Checkpoint(model.config, Schedule(schedule.sigmas(), schedule.eps, schedule.steps_per_level), model.state_dict(),
                                     model.state_dict(), None, 2500))
    return model, schedule, path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3-compatible server on the port AWS_ENDPOINT_URL names, with a bucket ``ncsn-test``."""
    from tests.servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"), port=S3_PORT).start()
    server.create_bucket("ncsn-test")
    yield server
    server.stop()
