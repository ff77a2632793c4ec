"""Servers tests start on loopback and stop themselves: the in-process local Ray, an MLflow tracking server (sqlite
backend), an S3-compatible server, a proxy that loses answers."""
from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_status(port: int, path: str) -> int | None:
    """The HTTP status of GET http://127.0.0.1:<port><path> (a server the test started), or None while none answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def start_local_ray() -> None:
    """The tests' in-process local Ray (2 CPUs). Its dashboard (on 127.0.0.1) serves the state API, which Ray Train V2
    uses to clean up the placement groups of runs whose controller was killed (Tune's stopped trials)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                 log_to_driver=False, configure_logging=False)


def joining_env() -> dict[str, str]:
    """The environment of a CLI subprocess that joins the tests' in-process Ray (RAY_ADDRESS, as on a cluster; token
    authentication on) instead of starting a local Ray of its own, which costs about 5 s to start and 2-4 s to stop."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


@contextmanager
def only_ray_instance():
    """Shut down the in-process Ray while a subprocess runs its own, then start it again. Ray Train's placement-group
    cleaner finds its cluster as the machine's only one; with two, it fails and Tune's stopped trials keep their CPUs."""
    import ray

    running = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        if running:
            start_local_ray()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and local artifacts; start(), stop(), start() again."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        mlflow = Path(sys.executable).parent / "mlflow"
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # its job runner: 8 processes the tests never use
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            if loopback_status(self.port, "/health") == 200:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer within {timeout} s")

    def stop(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as an outage does; sqlite keeps what it committed."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    """Poll ``condition()`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_actor_process(class_name: str) -> int:
    """SIGKILL the process of one live Ray actor of ``class_name`` (found through Ray's state API), as a lost node would
    take it; returns the PID."""
    import signal

    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    pid = next(a.pid for a in actors if class_name in a.class_name)
    os.kill(pid, signal.SIGKILL)
    return pid


class S3Server:
    """moto's standalone S3-compatible server on 127.0.0.1, reached by the clients a user's run uses (s3fs, pyarrow) through
    the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …). ``refuse_credentials`` makes it check every request
    against its (empty) IAM, so any key is refused, as a store refuses a wrong one."""

    def __init__(self, root: Path, port: int | None = None, refuse_credentials: bool = False):
        self.root, self.port, self.refuse = root, port or free_port(), refuse_credentials
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.refuse else {})}
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.root / f"moto-{self.port}.log", "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or loopback_status(self.port, "/moto-api/") is not None, timeout,
                 f"the S3 server on {self.endpoint}", every=0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto_server exited: {(self.root / f'moto-{self.port}.log').read_text()[-2000:]}")
        return self

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None


def upload_tree(local: str, url: str) -> str:
    """Copy the files under the directory ``local`` to the object-store prefix ``url``; returns ``url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    for f in Path(local).rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")
    return url


def clear_fsspec_instances() -> None:
    """Forget cached s3fs clients, so the next one reads the current AWS_* variables (a test that changes them)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def logged_image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps of the images logged under ``key`` (what the MLflow UI's image slider shows), from the artifact names
    MLflow gives them (images/<key>+step+<step>+timestamp+…png)."""
    names = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    return sorted(int(n.split("+step+")[1].split("+")[0]) for n in names if n.startswith(f"images/{key.replace('/', '~')}+step+"))


class AnswerLosingProxy:
    """An HTTP proxy on 127.0.0.1 in front of a server the test started. Each rule given to ``lose_answer`` fires once:
    the first request it matches reaches the server, but its answer is dropped and for ``down_s`` seconds every
    request is dropped unanswered, as when a server dies right after storing a record. ``lost`` lists the requests
    whose answers were lost."""

    def __init__(self, upstream_port: int, down_s: float = 1.0):
        self.upstream_port, self.down_s = upstream_port, down_s
        self.rules: list[tuple[str, str]] = []
        self.lost: list[str] = []
        self._down_until = 0.0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # requests sends an empty file chunked
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def _forward(self) -> None:
                body = self._body()
                with proxy._lock:
                    if time.monotonic() < proxy._down_until:
                        self.close_connection = True
                        return
                    rule = next((r for r in proxy.rules if r[0] == self.command and r[1] in self.path), None)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                hop = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                content = answer.read()
                upstream.close()
                if rule is not None:
                    with proxy._lock:
                        proxy.rules.remove(rule)
                        proxy.lost.append(f"{self.command} {self.path}")
                        proxy._down_until = time.monotonic() + proxy.down_s
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def lose_answer(self, method: str, path_part: str) -> None:
        """Lose the answer to the next ``method`` request whose path holds ``path_part``."""
        with self._lock:
            self.rules.append((method, path_part))

    def start(self) -> "AnswerLosingProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
