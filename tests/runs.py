"""The small `ncsn-pipeline run` the end-to-end tests share: its settings, its command line, and the run itself
submitted as a Ray job to a Ray head on 127.0.0.1 (the one-host run the two-host run must equal)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import free_port, loopback_status

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["train.steps=20", "train.batch_size=32", "train.log_every=10", "train.checkpoint_every=10", "train.sample_every=20",
         "evaluation.checkpoint_samples=30", "tracking.register_model=digits-small",
         "cluster.num_workers=2", "data.loader_workers=0", "tracking.system_metrics=false", "sampling.num_samples=60",
         "sampling.chunk_size=30", "sampling.steps_per_level=2", "sampling.workers=2"]


def run_args(run_dir: Path | str, eval_cache: Path | str, *settings: str, config: str = "configs/digits.yaml") -> list[str]:
    """`ncsn-pipeline run` with SMALL, then ``settings`` (KEY=VALUE, later ones win)."""
    return ["ncsn-pipeline", "run", "--config", config, "--no-progress", "--set", f"run_dir={run_dir}",
            "--set", f"evaluation.cache_dir={eval_cache}", *[a for s in (*SMALL, *settings) for a in ("--set", s)]]


def submit_pipeline_job(tmp_path: Path, eval_cache: Path) -> dict:
    """`ncsn-pipeline run` submitted as a Ray job to a Ray head started here on 127.0.0.1 with token authentication on,
    sharding the configured source itself: the job's log (its driver's stdout and stderr), its status as the Jobs API
    records it and its run directory."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ncsn-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                             "--temp-dir", ray_tmp], env=env, stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while loopback_status(dashboard, "/api/version") is None:  # any answer (401 without the token) means it is up
            assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                                 *run_args(run_dir, eval_cache)], env=env, capture_output=True, text=True, timeout=900)
        job = re.search(r"Job '(raysubmit_\w+)' succeeded", submit.stdout)
        assert submit.returncode == 0 and job, (submit.stdout + submit.stderr)[-4000:]
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job.group(1)], env=env,
                                capture_output=True, text=True, timeout=120)
    finally:  # killed, not stopped: the outputs are kept, and a graceful stop of the head takes about 30 s
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"log": submit.stdout, "job": job.group(1), "status": status.stdout + status.stderr, "run_dir": run_dir}
