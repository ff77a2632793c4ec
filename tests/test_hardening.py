"""Hardening: nothing unpickles a file a user or another tenant can write, no path from a manifest leaves
its shard folder, restarts recover from their own partial writes, and a failed write leaves nothing behind."""
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from ncsn.atomic import atomic_write
from ncsn.sigmas import Schedule
from pipelines.evaluate import EvaluationError, Evaluator


class _Planted:
    """A pickle that, if ever unpickled, creates the file named ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": _Planted(marker)}, path)  # a torch file whose unpickling runs code


def test_planted_pickles_in_the_evaluation_caches_are_never_unpickled(tmp_path, digits_shards):
    marker = tmp_path / "PWNED"
    cache = tmp_path / "cache"
    evaluator = Evaluator(digits_shards, "classifier", cache_dir=cache, resamples=20)
    samples = evaluator.reference[:40]
    first = evaluator.metrics(samples)
    caches = sorted(evaluator.cache.glob("features-*.pt"))
    assert len(caches) == 1  # the reference features, cached as tensors
    # ours (features, the classifier), and where torch-fidelity's cache went
    for path in caches + [evaluator.cache / "classifier.pt", evaluator.cache / "torch-fidelity" / "fid_stats_test.pt"]:
        _plant(path, marker)
    again = Evaluator(digits_shards, "classifier", cache_dir=cache, resamples=20).metrics(samples)
    assert not marker.exists()
    assert again == pytest.approx(first)  # recomputed, not read from the planted file
    reloaded = torch.load(caches[0], weights_only=True)  # and rewritten as plain tensors
    assert all(isinstance(v, torch.Tensor) for v in reloaded.values())


def test_planted_inception_weights_in_the_hub_cache_are_refused(tmp_path, digits_shards, monkeypatch):
    # No --inception-weights: torch-fidelity would take the file torch.hub cached (user-writable) with weights_only=False.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    marker = tmp_path / "PWNED"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _plant(tmp_path / "torch" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1], marker)
    with pytest.raises(EvaluationError, match="cannot load the Inception weights .*--inception-weights PATH"):
        Evaluator(digits_shards, "inception", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_too_few_bootstrap_resamples_are_refused(digits_shards, tmp_path):
    for bad in (0, 9, -3):
        with pytest.raises(EvaluationError, match=f"bootstrap resamples must be an integer >= 10, got {bad}"):
            Evaluator(digits_shards, "classifier", cache_dir=tmp_path, resamples=bad)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "file.bin"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def disk_full(p: Path) -> None:
        p.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


def _shard_digits(out: Path):
    from data_prep.shard import ShardOptions, shard_dataset

    return shard_dataset(ShardOptions("digits", shard_size=600), str(out), progress=False)


def test_manifest_paths_outside_the_shard_folder_are_never_read_or_removed(tmp_path, ray_local):
    from data_prep.loader import make_loader
    from data_prep.manifest import ShardError, load_manifest
    from data_prep.shard import verify_shards

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "data" / "shards"
    _shard_digits(out)
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for bad in ("../../victim.txt", str(victim), "train/../../../victim.txt", "./train/x.tar"):
        manifest["splits"]["train"]["shards"][0]["path"] = bad
        manifest_file.write_text(json.dumps(manifest))
        expected = f"{out}/manifest.json: split train: shard path {bad!r} is not a relative path inside the shard folder"
        for read in (load_manifest, verify_shards, lambda s: make_loader(s, 8)):
            with pytest.raises(ShardError, match=re.escape(expected)):
                read(str(out))
    manifest["splits"]["train"]["shards"][0]["path"] = "../../victim.txt"
    manifest["fingerprint"] = "other options"  # a re-run rewrites and removes the old manifest's stale shards
    manifest_file.write_text(json.dumps(manifest))
    summary = _shard_digits(out)
    assert not summary.up_to_date and victim.read_text() == "keep me"
    assert verify_shards(str(out)) == []


def test_a_shard_changed_in_place_is_not_up_to_date(tmp_path, ray_local):
    out = tmp_path / "shards"
    _shard_digits(out)
    shard = sorted((out / "train").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    again = _shard_digits(out)
    assert not again.up_to_date
    from data_prep.shard import verify_shards

    assert verify_shards(str(out)) == []


def test_images_whose_values_a_conversion_would_change_are_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from data_prep.sources import ImageFolderSource, SourceError

    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")  # 16-bit grey
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(tmp_path / "a" / "glass.png")
    opaque = rgba.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(tmp_path / "a" / "opaque.png")
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")  # colour 0 transparent (tRNS)
    palette.save(tmp_path / "a" / "keyed.png", transparency=0)
    palette.save(tmp_path / "a" / "unused_key.png", transparency=255)  # a transparent colour no pixel has
    source = ImageFolderSource(tmp_path, test_fraction=0)
    with pytest.raises(SourceError, match=r"deep.png: image mode I;16 .*would clip"):
        source.load(Path("a/deep.png"))
    with pytest.raises(SourceError, match=r"glass.png: has transparent pixels"):
        source.load(Path("a/glass.png"))
    assert source.load(Path("a/opaque.png")).shape == (8, 8, 3)  # fully opaque alpha is dropped losslessly
    with pytest.raises(SourceError, match=r"keyed.png: has transparent pixels"):  # a palette's transparent colour was let through
        source.load(Path("a/keyed.png"))
    assert source.load(Path("a/unused_key.png")).shape == (8, 8, 3)


def test_a_torn_metrics_line_is_left_out_and_the_file_repaired(tmp_path):
    from pipelines.tracking import read_metric_rows
    from pipelines.train_worker import _drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n{"step": 15, "loss": 0.8}\n{"step": 20, "lo')
    assert [r["step"] for r in read_metric_rows(path)] == [5, 10, 15]
    _drop_metrics_after(path, 10)  # what a restore from the step-10 checkpoint does
    assert path.read_text() == '{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n'


def _write_checkpoint(path: Path, nan: bool = False, size: int = 8):
    from ncsn.checkpoint import Checkpoint, save_checkpoint
    from ncsn.models import ModelConfig, ScoreNetwork
    from ncsn.sigmas import Schedule, geometric_sigmas

    sigmas = geometric_sigmas(1.0, 0.01, 4)
    model = ScoreNetwork(ModelConfig("ncsnv2", size, 1, 8), sigmas)
    state = model.state_dict()
    if nan:
        next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    save_checkpoint(path, Checkpoint(model.config, Schedule(sigmas, 1e-4, 2), state, state, None, 3))
    return path


def test_sampling_input_is_checked_and_nothing_given_is_replaced(tmp_path):
    from pipelines.sample import SamplingError, SamplingOptions, read_checkpoint, resolve_options, run_inpainting

    with pytest.raises(SamplingError, match=r"nan.pt: 1 weight tensor\(s\) hold NaN or inf"):
        read_checkpoint(_write_checkpoint(tmp_path / "nan.pt", nan=True))
    ckpt, _ = read_checkpoint(_write_checkpoint(tmp_path / "ok.pt"))
    run_dir = tmp_path / "run"
    with pytest.raises(SamplingError, match=r"run is a directory without model/checkpoint.pt or checkpoint.pt: is it a training run"):
        read_checkpoint(run_dir.mkdir() or run_dir)
    _write_checkpoint(run_dir / "model" / "checkpoint.pt", nan=True)  # a run directory names its model/checkpoint.pt
    with pytest.raises(SamplingError, match=r"hold NaN or inf"):
        read_checkpoint(run_dir)
    bad = {"eps": (0.0, r"--eps must be a finite number > 0, got 0.0"), "steps_per_level": (0, r"--steps-per-level must be an integer >= 1, got 0"),
           "sigmas": ([0.5, 0.9], r"--sigmas must be strictly decreasing"),
           "trajectory_samples": (-1, r"trajectory_samples must be in \[0, chunk_size = 100\], got -1")}
    for key, (value, message) in bad.items():
        with pytest.raises(SamplingError, match=message):
            resolve_options(ckpt, SamplingOptions(10, **{key: value}))
    assert resolve_options(ckpt, SamplingOptions(10, eps=3e-5)).schedule.eps == 3e-5  # given: kept; the checkpoint's is 1e-4
    with pytest.raises(SamplingError, match=r"ok.pt models 1×8×8 images; the images to inpaint are 3×32×32"):
        run_inpainting(tmp_path / "ok.pt", torch.rand(2, 3, 32, 32), "centre", tmp_path / "paint")


def test_damaged_sample_files_are_one_line_and_stale_temporaries_are_removed(tmp_path):
    import numpy as np

    from pipelines.sample import SamplerSettings, SamplingError, _claim_output, load_samples, read_settings

    out = tmp_path / "samples"
    (out / "images").mkdir(parents=True)
    (out / "chunks").mkdir()
    for stale in (out / "images" / ".000001.png.abc.tmp", out / "chunks" / ".chunk_00000.npz.def.tmp", out / ".sampling.json.x.tmp",
                  out / ".grid.png.y.tmp", out / ".notes.tmp", out / "images" / ".mine.tmp"):
        stale.write_bytes(b"half")
    settings = SamplerSettings(2, 0, 1, Schedule((1.0, 0.25), 1e-4, 5, denoise=False), 0, "checkpoint.pt", 10, None, None, 10)
    _claim_output(out, settings)
    assert sorted(p.name for p in out.rglob("*.tmp")) == [".mine.tmp", ".notes.tmp"]  # the user's own files stay
    on_disk = json.loads((out / "sampling.json").read_text())  # flat: sample sets written before the Schedule field resume
    assert (on_disk["sigmas"], on_disk["eps"], on_disk["steps_per_level"], on_disk["denoise"]) == ([1.0, 0.25], 1e-4, 5, False)
    assert read_settings(out) == settings
    for key in ("s_tmin", "s_tmax", "s_noise"):  # a set from before churn's range and noise scale came: their defaults
        del on_disk["sampler"][key]
    (out / "sampling.json").write_text(json.dumps(on_disk))
    assert read_settings(out) == settings
    _claim_output(out, settings)
    del on_disk["sampler"], on_disk["nfe_per_image"]  # a set from before the samplers came: annealed Langevin, L·T evaluations
    (out / "sampling.json").write_text(json.dumps(on_disk))
    assert read_settings(out) == settings
    _claim_output(out, settings)  # resumable with the settings it was made with
    np.savez(out / "chunks" / "chunk_00000.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    (out / "chunks" / "chunk_00001.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(SamplingError, match=r"chunk_00001.npz: not a readable sample chunk"):
        load_samples(out)


def _run_side_by_side(commands: list[list[str]], **kwargs) -> list:
    """Each command's CompletedProcess, three at a time (the CLI's start-up is mostly imports: they overlap)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, timeout=180, **kwargs), commands))


def test_cli_reads_damaged_run_files_and_bad_options_as_one_line(tmp_path):
    import sys

    cli = str(Path(sys.executable).parent / "ncsn-pipeline")
    (tmp_path / "mlflow_run.json").write_text('{"run_id": "ab')
    cases = [
        (["sync-metrics", str(tmp_path)], f"ncsn-pipeline sync-metrics: error: {tmp_path}/mlflow_run.json is damaged"),
        (["shard", "--source", "digits", "--output", str(tmp_path / "s"), "--workers", "0"], "ncsn-pipeline shard: error: --workers must be >= 1, got 0"),
        (["train", "--config", str(tmp_path)], f"ncsn-pipeline train: error: config file {tmp_path} is a directory"),
        (["train", "--config", "configs/digits.yaml", "--set", "tune.steps_per_level=[5,"],
         "ncsn-pipeline train: error: --set tune.steps_per_level=[5,: the value is not valid YAML"),
    ]
    for (args, first), out in zip(cases, _run_side_by_side([[cli, *args] for args, _ in cases], cwd=Path(__file__).resolve().parents[1])):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith(first), out.stderr


def test_outputs_that_must_be_local_refuse_a_url_in_one_line_before_any_work(tmp_path):
    # Written as a local path, s3://ncsn/samples became a folder called "s3:" in the working directory, and the command
    # exited 0. Sample sets, inpainting grids, evaluation reports and run directories are local; a URL is one line.
    import sys

    cli = str(Path(sys.executable).parent / "ncsn-pipeline")
    checkpoint = _write_checkpoint(tmp_path / "ok.pt")
    cases = [
        (["sample", "--checkpoint", str(checkpoint), "--num-samples", "4", "--output", "s3://ncsn/samples"],
         "ncsn-pipeline sample: error: --output s3://ncsn/samples: a local path is needed here"),
        (["inpaint", "--checkpoint", str(checkpoint), "--shards", str(tmp_path), "--output", "gs://ncsn/paint"],
         "ncsn-pipeline inpaint: error: --output gs://ncsn/paint: a local path is needed here"),
        (["evaluate", "--samples", str(tmp_path), "--reference", str(tmp_path), "--output", "s3://ncsn/r.json"],
         "ncsn-pipeline evaluate: error: --output s3://ncsn/r.json: a local path is needed here"),
        (["evaluate", "--samples", str(tmp_path), "--reference", str(tmp_path), "--output", str(tmp_path / "no" / "r.json")],
         f"ncsn-pipeline evaluate: error: --output {tmp_path / 'no' / 'r.json'}: its directory {tmp_path / 'no'} does not exist"),
        (["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"), "--set", "run_dir=s3://ncsn/runs",
          "--dry-run"],
         "ncsn-pipeline train: error: run_dir must be a local directory, not a URL"),
    ]
    outs = _run_side_by_side([[cli, *args] for args, _ in cases], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    for (args, first), out in zip(cases, outs):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith(first), (args, out.stderr[-1500:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]  # no "s3:" or "gs:" folder, nothing else written


def test_an_mlflow_model_uri_without_a_tracking_uri_is_one_line_and_creates_nothing(tmp_path):
    # MLflow, asked for runs:/… with no tracking URI, made ./mlflow.db and answered "Run … not found".
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "ncsn-pipeline")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([cli, "sample", "--checkpoint", "runs:/0123abcd/model", "--num-samples", "4", "--output", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-1500:]
    assert lines[0].startswith("ncsn-pipeline sample: error: runs:/0123abcd/model: set MLFLOW_TRACKING_URI")
    assert list(tmp_path.iterdir()) == []

    # A server that accepts connections and never answers: MLflow's own defaults (7 retries of up to 120 s) waited
    # about 17 minutes; the project bounds the retries (2, where the user sets none) and ends in one line naming it.
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:
        server = f"http://127.0.0.1:{hung.getsockname()[1]}"
        out = subprocess.run([cli, "sample", "--checkpoint", "runs:/0123abcd/model", "--num-samples", "4", "--output", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**env, "MLFLOW_TRACKING_URI": server, "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-1500:]
    assert lines[0].startswith(f"ncsn-pipeline sample: error: runs:/0123abcd/model: {server} (MLFLOW_TRACKING_URI) did not give "
                               "the model after 2 retries of at most 1 s: "), lines[0]
    assert list(tmp_path.iterdir()) == []


_RENDEZVOUS = """
import psutil
from pipelines.rendezvous import _join, _listen

def listening():
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN}

before = listening()
_join("gloo", "127.0.0.1", _listen("127.0.0.1"), 0, 1, 30)
print(sorted(listening() - before))
"""


def test_the_process_group_rendezvous_listens_on_loopback_only():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RENDEZVOUS], capture_output=True, text=True, timeout=120, check=True).stdout
    opened = eval(out.strip().splitlines()[-1])  # noqa: S307 - the list of (ip, port) the child printed
    assert opened, "the process group opened no listening socket"  # the store's (and gloo's) listeners
    assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened  # torch's default store listens on every interface ("::")


def test_the_interface_of_an_address_is_the_one_that_holds_it():
    # across hosts Gloo is pointed at the interface of the node's Ray address (tests/test_two_hosts.py runs it for real)
    from pipelines.rendezvous import interface_of

    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.1") is None  # (TEST-NET-1: on no interface)


def test_a_run_directory_is_one_commands_at_a_time_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    # Two identical `train` commands on one run_dir both ran, each step twice in metrics.jsonl and MLflow. A holder (a real
    # process in the lock) makes a second command a one-line refusal naming it; killed from outside, it leaves nothing
    # that blocks the next command (which here goes on to its next check, the missing shards).
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipelines.lock import run_dir_lock\n"
                               "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(300)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert holder.stdout.readline().strip() == "held"
        command = [str(Path(sys.executable).parent / "ncsn-pipeline"), "train", "--config", str(root / "configs" / "digits.yaml"),
                   "--set", f"run_dir={run_dir}", "--shards", str(tmp_path / "no-shards")]
        busy = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        lines = busy.stderr.strip().splitlines()
        assert busy.returncode == 1 and len(lines) == 1, busy.stderr[-1500:]
        assert lines[0].startswith(f"ncsn-pipeline train: error: run_dir {run_dir} is in use by another command (pid {holder.pid} on ")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        free = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert free.returncode == 1 and "no manifest.json in" in free.stderr and "in use" not in free.stderr, free.stderr[-1500:]
    finally:
        holder.kill()
        holder.wait()
