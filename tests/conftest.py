import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
# Ray Train's controller polls its workers every 2 s, so each run ends (and starts) up to 2 s late; the tests run dozens.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# The tests' S3-compatible server (tests.servers.S3Server, started on first use) is reached the standard way; set before
# any Ray instance starts, so Ray's workers inherit it too. Fixed test credentials, nothing outside 127.0.0.1.
from tests.servers import free_port  # noqa: E402

S3_PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_var, None)


# The evaluation cache every command finds unless told another ($NCSN_CACHE): one per session (the feature classifier trains
# once per shard set), never the user's ~/.cache; Ray's workers inherit it.
os.environ["NCSN_CACHE"] = tempfile.mkdtemp(prefix="ncsn-cache-")

# Fixtures that start Ray or train the shared digits model: tests using them are left out of `make test-fast`.
CLUSTER_FIXTURES = {"ray_local", "digits_shards", "trained_digits"}
ROOT = Path(__file__).resolve().parents[1]
_background: dict = {}  # the process training the digits model, its log and checkpoint, while a session needs them


def pytest_collection_modifyitems(config, items):
    """Mark as `cluster` every test that needs a Ray instance or the trained model (by fixture, or marked by hand). The
    tests that read the trained digits model go last: it trains in the background meanwhile (pytest_collection_finish)."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: "trained_digits" in getattr(item, "fixturenames", ()))  # stable: otherwise in order


def pytest_collection_finish(session):
    """Start training the digits model when a selected test reads it, at the lowest CPU priority (see the script): the
    Ray tests before it leave a core idle much of the time."""
    if any("trained_digits" in getattr(item, "fixturenames", ()) for item in session.items) and not session.config.option.collectonly:
        directory = Path(tempfile.mkdtemp(prefix="ncsn-digits-model-"))
        log = open(directory / "train.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "scripts" / "train_digits_model.py"), str(directory / "checkpoint.pt")],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _background.update(process=process, directory=directory, log=log)


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["NCSN_CACHE"], ignore_errors=True)
    if _background:
        if _background["process"].poll() is None:
            _background["process"].kill()
            _background["process"].wait()
        _background["log"].close()
        shutil.rmtree(_background["directory"], ignore_errors=True)


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
def trained_digits():
    """The digits NCSN of examples/digits.py (2500 steps; about 2½ minutes alone), trained once per session in the
    background (pytest_collection_finish). Returns (EMA model, its Schedule, checkpoint path)."""
    from ncsn.checkpoint import load_checkpoint

    process, directory = _background["process"], _background["directory"]
    process.wait(timeout=1800)
    assert process.returncode == 0, (directory / "train.log").read_text()[-3000:]
    ckpt = load_checkpoint(directory / "checkpoint.pt")
    return ckpt.build_model().eval(), ckpt.schedule, directory / "checkpoint.pt"


@pytest.fixture(scope="session")
def trained_digits_samples(trained_digits) -> torch.Tensor:
    """500 samples of the trained digits model in [0, 1] (N, 1, 8, 8): annealed Langevin with its schedule, seed 0, in
    this process; judged by test_digits_quality.py and scored by the evaluator in test_sample_evaluate.py."""
    from ncsn.sampling import annealed_langevin_dynamics

    model, schedule, _ = trained_digits
    gen = torch.Generator().manual_seed(0)
    return annealed_langevin_dynamics(model, torch.rand(500, 1, 8, 8, generator=gen), schedule.tensor(), schedule.eps,
                                      schedule.steps_per_level, denoise=True, generator=gen).samples


@pytest.fixture(scope="session")
def eval_cache() -> Path:
    """The session's evaluation cache ($NCSN_CACHE), for tests that pass it explicitly: the feature classifier trains once
    per shard set (its own test trains a second one beside it, in a cache of its own)."""
    return Path(os.environ["NCSN_CACHE"])


@pytest.fixture(scope="session")
def pipeline_job(tmp_path_factory, eval_cache) -> dict:
    """The small pipeline run as a Ray job on a one-host Ray (tests.runs.submit_pipeline_job), once per session: the
    end-to-end tests read it, and the two-host run must give its numbers. The tests' in-process Ray is shut down meanwhile."""
    from tests.runs import submit_pipeline_job
    from tests.servers import only_ray_instance

    with only_ray_instance():
        return submit_pipeline_job(tmp_path_factory.mktemp("job"), eval_cache)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3-compatible server on the port AWS_ENDPOINT_URL names, with a bucket ``ncsn-test``."""
    from tests.servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"), port=S3_PORT).start()
    server.create_bucket("ncsn-test")
    yield server
    server.stop()
