"""Parallel sampling (reproducible whatever the worker count, resumable after a lost actor), inpainting,
and FID / IS / KID with the classifier and the Inception feature extractors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from ncsn.checkpoint import Checkpoint, save_checkpoint
from ncsn.data import to_stored
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import Schedule, geometric_sigmas
from pipelines.evaluate import EvaluationError, Evaluator
from pipelines.sample import SamplingError, SamplingOptions, load_samples, run_sampling
from tests.servers import joining_env

CLI = str(Path(sys.executable).parent / "ncsn-pipeline")


def sample_set_digest(output: str | Path) -> str:
    """SHA-256 over all sample PNG bytes in index order: equal digests, identical sample sets."""
    h = hashlib.sha256()
    for f in sorted(Path(output, "images").glob("*.png")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """An untrained digits-sized model: sampling with it costs little and is just as deterministic."""
    sigmas = geometric_sigmas(1.0, 0.01, 5)
    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 16), sigmas)
    path = tmp_path_factory.mktemp("small") / "checkpoint.pt"
    save_checkpoint(path, Checkpoint(model.config, Schedule(sigmas, 1e-4, 2), model.state_dict(), model.state_dict(), None, 7))
    return path


def _options(n: int = 40) -> SamplingOptions:
    return SamplingOptions(num_samples=n, seed=3, chunk_size=10, trajectory_samples=4)


def test_same_seed_gives_identical_samples_with_one_or_two_workers(tmp_path, small_checkpoint, ray_local):
    one = run_sampling(small_checkpoint, tmp_path / "one", _options(), workers=1, progress=False)
    two = run_sampling(small_checkpoint, tmp_path / "two", _options(), workers=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "one" / "images").iterdir()) == [f"{i:06d}.png" for i in range(40)]
    assert sample_set_digest(tmp_path / "one") == sample_set_digest(tmp_path / "two")
    assert (one.chunks_done, two.chunks_done) == (4, 4)
    assert (tmp_path / "two" / "grid.png").exists() and (tmp_path / "two" / "trajectory.png").exists()
    other_seed = run_sampling(small_checkpoint, tmp_path / "seed4", SamplingOptions(40, seed=4, chunk_size=10), workers=2, progress=False)
    assert sample_set_digest(other_seed.output) != sample_set_digest(tmp_path / "one")


def test_sampling_into_a_full_disk_is_one_line_and_the_same_command_completes_the_set(tmp_path, small_checkpoint, ray_local, capsys):
    # The output on a 64 KiB tmpfs: it fills after a few chunks. One line naming the file, exit 1, instead of a traceback;
    # with space freed the same command redoes only the chunks not written whole, and the set equals one made at once.
    from pipelines.cli import main
    from tests.hosts import small_disk

    out = tmp_path / "full"
    with small_disk(out, "64k") as resize:
        command = ["sample", "--checkpoint", str(small_checkpoint), "--num-samples", "40", "--chunk-size", "5", "--no-progress"]
        assert main([*command, "--output", str(out / "samples")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ncsn-pipeline sample: error: no space left on the device of {out / 'samples'}/"), err
        resize("4m")  # space freed
        assert main([*command, "--output", str(out / "samples")]) == 0
        assert main([*command, "--output", str(tmp_path / "whole")]) == 0  # the same set, made at once
        assert sample_set_digest(out / "samples") == sample_set_digest(tmp_path / "whole")


def test_every_sampler_runs_on_the_actors_and_its_sample_set_states_its_nfe(tmp_path, small_checkpoint, ray_local):
    # The stochastic EDM sampler (churn) gives the same images on one actor or two; each set's sampling.json names its
    # sampler and its network evaluations per image (the checkpoint's 5 levels, T = 2: Algorithm 1 takes 5·2 + 1).
    from ncsn.checkpoint import load_checkpoint
    from pipelines.sample import read_settings, resolve_options

    churned = SamplingOptions(20, seed=3, chunk_size=10, sampler="heun", sampler_steps=5, churn=10.0, s_noise=0.9)
    one = run_sampling(small_checkpoint, tmp_path / "heun1", churned, workers=1, progress=False)
    two = run_sampling(small_checkpoint, tmp_path / "heun2", churned, workers=2, progress=False)
    pc = run_sampling(small_checkpoint, tmp_path / "pc", SamplingOptions(20, seed=3, chunk_size=10, sampler="pc", sampler_steps=4),
                      workers=2, progress=False)
    assert sample_set_digest(one.output) == sample_set_digest(two.output) != sample_set_digest(pc.output)
    for out, name, nfe in ((tmp_path / "heun1", "heun", 2 * 5 - 1), (tmp_path / "pc", "pc", 4 * 2)):
        record = json.loads((out / "sampling.json").read_text())
        assert record["sampler"]["name"] == name and record["nfe_per_image"] == nfe
    assert read_settings(tmp_path / "heun1").schedule.sampler.churn == 10.0 and "(heun:N=5,churn=10,s_noise=0.9)" in one.line()
    ckpt = load_checkpoint(small_checkpoint)
    for name, nfe in (("als", 11), ("euler", 5)):  # the others' counts, as sampling.json would state them
        assert resolve_options(ckpt, SamplingOptions(20, sampler=name)).record()["nfe_per_image"] == nfe
    with pytest.raises(SamplingError, match="holds samples made with other settings"):  # a set is never completed by another sampler
        run_sampling(small_checkpoint, tmp_path / "pc", SamplingOptions(20, seed=3, chunk_size=10, sampler="heun"), progress=False)


def test_a_sampler_a_checkpoint_cannot_take_is_one_line_before_ray(tmp_path):
    from pipelines.sample import resolve_options

    sigmas = geometric_sigmas(1.0, 0.01, 5)
    ckpt = Checkpoint(ModelConfig("ncsn", 8, 1, 16), Schedule(sigmas, 1e-4, 2), {}, None, None, 0)
    with pytest.raises(SamplingError, match=r"^--sampler: churn evaluates the model between its levels"):
        resolve_options(ckpt, SamplingOptions(10, sampler="heun", sampler_steps=4, churn=5.0))
    with pytest.raises(SamplingError, match=r"^--sampler: sampler must be one of als, pc, euler, heun, got 'ddim'"):
        resolve_options(ckpt, SamplingOptions(10, sampler="ddim"))
    with pytest.raises(SamplingError, match=r"^--sampler: s_noise shape EDM Algorithm 2's churn, which is 0 here"):
        resolve_options(ckpt, SamplingOptions(10, sampler="heun", sampler_steps=4, s_noise=1.007))
    settings = resolve_options(ckpt, SamplingOptions(10, sampler="heun", sampler_steps=30))  # 30 ρ-levels onto 5 trained ones
    assert settings.nfe_per_image <= 2 * 5 - 1


def test_lost_actor_and_unfinished_chunk_are_redone_exactly(tmp_path, small_checkpoint, ray_local):
    import threading

    from tests.servers import kill_actor_process, wait_for

    # 10 chunks of about 0.7 s each (1-2 are done when the kill lands, in 3 trials: each of the 2 actors has seconds left)
    slow = SamplingOptions(num_samples=40, seed=3, chunk_size=4, steps_per_level=30, trajectory_samples=4)
    reference = run_sampling(small_checkpoint, tmp_path / "ref", slow, workers=2, progress=False)
    # An actor's process is killed from outside once the first chunk is done: Ray restarts it and retries its chunk.
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(summary=run_sampling(small_checkpoint, tmp_path / "killed", slow,
                                                                              workers=2, progress=False)))
    runner.start()
    wait_for(lambda: list((tmp_path / "killed" / "chunks").glob("chunk_*.npz")), 120, "the first chunk")
    killed = kill_actor_process("SamplingActor")
    finished_before = len(list((tmp_path / "killed" / "chunks").glob("chunk_*.npz")))
    runner.join(timeout=300)
    assert killed > 0 and finished_before < 10  # killed mid-run
    assert "summary" in done  # the run completed despite the lost actor
    assert len(list((tmp_path / "killed" / "images").glob("*.png"))) == 40
    assert sample_set_digest(tmp_path / "killed") == sample_set_digest(reference.output)
    run_sampling(small_checkpoint, tmp_path / "out", _options(), workers=2, progress=False)
    whole = sample_set_digest(tmp_path / "out")
    # A sampler killed mid-chunk leaves some PNGs and no .npz: a re-run redoes that chunk only, exactly.
    (tmp_path / "out" / "chunks" / "chunk_00001.npz").unlink()
    (tmp_path / "out" / "images" / "000013.png").unlink()
    again = run_sampling(small_checkpoint, tmp_path / "out", _options(), workers=2, progress=False)
    assert (again.chunks_done, again.chunks_skipped) == (1, 3)
    assert sample_set_digest(tmp_path / "out") == whole
    assert load_samples(tmp_path / "out").shape == (40, 8, 8, 1)
    with pytest.raises(SamplingError, match=r"holds samples made with other settings \(seed: 3 → 5\)"):
        run_sampling(small_checkpoint, tmp_path / "out", SamplingOptions(40, seed=5, chunk_size=10, trajectory_samples=4), progress=False)


def test_inpaint_cli_writes_the_occluded_completed_original_grid(tmp_path, small_checkpoint, digits_shards):
    out = subprocess.run([CLI, "inpaint", "--checkpoint", str(small_checkpoint), "--shards", digits_shards, "--mask", "half",
                          "--num-images", "3", "--completions", "2", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=joining_env())
    assert out.returncode == 0, out.stderr[-2000:]
    from PIL import Image

    grid = Image.open(tmp_path / "inpainting_half.png")
    assert grid.size == (4 * (32 + 4) + 4, 3 * (32 + 4) + 4)  # 4 columns (occluded, 2 completions, original) × 3 rows, 4× scale


@pytest.mark.slow
def test_the_trained_model_is_near_the_real_data_and_far_from_the_gaussian(trained_digits_samples, digits_shards, eval_cache):
    # Intervals and spreads, not one run's numbers: the model's KID interval lies wholly below the fitted Gaussian's, and its
    # FID and IS are further from the Gaussian's than three of their sds together.
    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache)
    report = evaluator.report(to_stored(trained_digits_samples), 500)
    print(report.table())
    model, gaussian = report.model, report.baselines["gaussian"]
    assert model.kid.high < gaussian.kid.low
    assert gaussian.fid.value - model.fid.value > 3 * (gaussian.fid.sd + model.fid.sd)
    assert model.inception_score.value - gaussian.inception_score.value > 3 * (gaussian.inception_score.sd + model.inception_score.sd)
    assert model.num_samples == 500 and model.num_reference == 297 and model.reference_split == "test"
    assert set(report.flat()) >= {"kid_std_classifier", "kid_std_classifier_low", "kid_std_classifier_high", "fid_classifier",
                                  "fid_classifier_sd", "is_1split_classifier", "is_1split_classifier_sd", "num_samples", "num_reference",
                                  "gaussian_kid_std_classifier_low", "heldout_real_num_samples"}
    # the held-out real images are the validation split's 297, never trained on by the model or the classifier
    assert report.baselines["heldout_real"].num_samples == 297 and report.baselines["heldout_real"].kid.low <= 0


def _random_inception_weights(path: Path) -> Path:
    """An Inception-v3 of torch-fidelity's architecture with random weights: the offline code path, not a meaningful number."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch.load", lambda *a, **k: {}), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return path


def test_inception_metrics_from_a_weights_file_given_by_path(tmp_path, ray_local):
    # a reference of 12 images (MNIST files, sharded): InceptionV3 on CPU takes about 0.1 s an image (upsampled to 299×299)
    from data_prep.shard import ShardOptions, shard_dataset
    from tests.datasets import write_mnist

    write_mnist(tmp_path / "mnist", n_train=4, n_test=12)
    shards = str(tmp_path / "shards")
    shard_dataset(ShardOptions("mnist", str(tmp_path / "mnist"), shard_size=16), shards, progress=False)
    weights = _random_inception_weights(tmp_path / "inception.pt")
    evaluator = Evaluator(shards, "inception", inception_weights=str(weights), cache_dir=tmp_path / "cache", resamples=20)
    samples = np.random.default_rng(0).integers(0, 256, size=(24, 28, 28, 1), dtype=np.uint8)
    metrics = evaluator.metrics(samples)
    assert {"fid_inception", "is_1split_inception", "kid_std_inception", "kid_std_inception_low", "kid_std_inception_high"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["num_reference"] == 12
    again = Evaluator(shards, "inception", inception_weights=str(weights), cache_dir=tmp_path / "cache", resamples=20)
    assert again.extractor_id == evaluator.extractor_id  # the feature cache is found again for the same weights
    assert len(list(evaluator.cache.glob("features-*.pt"))) == 1 and len(list(evaluator.cache.glob("kid-scaler-*.pt"))) == 1


def test_unsafe_or_wrong_inception_weights_are_refused_before_torch_fidelity_loads_them(tmp_path, digits_shards):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")  # needs weights_only=False: could run code
    with pytest.raises(EvaluationError, match="pickled_module.pt: not a plain PyTorch state dict that loads with weights_only=True"):
        Evaluator(digits_shards, "inception", inception_weights=str(tmp_path / "pickled_module.pt"), cache_dir=tmp_path)
    with pytest.raises(EvaluationError, match="missing.pt: no such file"):
        Evaluator(digits_shards, "inception", inception_weights=str(tmp_path / "missing.pt"), cache_dir=tmp_path)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other_network.pt")  # plain tensors, of another network
    with pytest.raises(EvaluationError, match=r"other_network.pt: these tensors are not torch-fidelity's Inception v3 \(Error"):
        Evaluator(digits_shards, "inception", inception_weights=str(tmp_path / "other_network.pt"), cache_dir=tmp_path)


def test_evaluate_cli_errors_name_the_problem(tmp_path, digits_shards):
    out = subprocess.run([CLI, "evaluate", "--samples", str(tmp_path), "--reference", digits_shards], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (f"ncsn-pipeline evaluate: error: {tmp_path} holds neither sample chunks "
                                                   "(chunks/chunk_*.npz from `ncsn-pipeline sample`) nor .png/.jpg/.jpeg images")


def test_sample_inpaint_and_evaluate_log_to_child_runs_and_never_into_the_training_run(tmp_path, small_checkpoint, digits_shards,
                                                                                      eval_cache):
    # An ad-hoc `sample --num-samples 300` then `evaluate` rewrote the training run's kid_classifier at its last step;
    # each ad-hoc command now logs a child run of the checkpoint's training run, and a re-run that did nothing, nothing.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("s")
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "kid_std_classifier", 0.05, step=10)  # what training's own evaluation logged
    ckpt = torch.load(small_checkpoint, weights_only=True)
    ckpt["run"] = {"tracking_uri": uri, "run_id": run_id}  # the checkpoint's typed MLflow run field
    torch.save(ckpt, tmp_path / "tracked.pt")

    def children() -> dict[str, object]:
        found = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'")
        return {r.info.run_name: r for r in found}

    sample = [CLI, "sample", "--checkpoint", str(tmp_path / "tracked.pt"), "--num-samples", "20", "--chunk-size", "5", "--workers", "1",
              "--output", str(tmp_path / "s"), "--no-progress"]
    out = subprocess.run(sample, capture_output=True, text=True, timeout=300, env=joining_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"joined the Ray cluster at {joining_env()['RAY_ADDRESS']}: 2 CPUs" in out.stderr
    # The actors get the weights with each call: Ray's line (once per driver) for restartable actors whose constructor
    # arguments are in the object store, which it could not restart once those are gone (ray-project/ray#53727), is absent.
    assert "max_restarts" not in out.stderr
    child = children()["sample-s"]
    assert f"logged to MLflow run {child.info.run_id}, a child of the checkpoint's training run {run_id}" in out.stdout
    assert f"20 samples of seed 0 in {tmp_path / 's'} (4 chunks sampled, 0 already complete; the same seed" in out.stdout
    assert child.info.status == "FINISHED" and "sampling_samples_per_s" in child.data.metrics and child.data.params["num_samples"] == "20"
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"samples", "trajectory"}
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["mlflow_run_id"] == run_id
    again = subprocess.run(sample, capture_output=True, text=True, timeout=300, env=joining_env())
    assert again.returncode == 0 and "nothing new was sampled, so nothing new is logged to MLflow" in again.stdout, again.stderr[-2000:]
    assert list(children()) == ["sample-s"]
    paint = subprocess.run([CLI, "inpaint", "--checkpoint", str(tmp_path / "tracked.pt"), "--shards", digits_shards, "--num-images", "2",
                            "--completions", "1", "--output", str(tmp_path / "p")], capture_output=True, text=True, timeout=300,
                           env=joining_env())
    assert paint.returncode == 0, paint.stderr[-2000:]
    assert {a.path for a in client.list_artifacts(children()["inpaint-centre"].info.run_id)} == {"inpainting"}
    evaluate = subprocess.run([CLI, "evaluate", "--samples", str(tmp_path / "s"), "--reference", digits_shards, "--no-baselines",
                               "--cache-dir", str(eval_cache), "--resamples", "20"], capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    scored = children()["evaluate-classifier"]
    assert "kid_std_classifier" in scored.data.metrics and {a.path for a in client.list_artifacts(scored.info.run_id)} == {"evaluation"}
    assert [m.step for m in client.get_metric_history(scored.info.run_id, "kid_std_classifier")] == [ckpt["step"]]
    assert scored.data.tags["card.convention"] == "project" and scored.data.tags["card.num_samples"] == "20"
    training = client.get_run(run_id)
    assert client.list_artifacts(run_id) == [] and training.data.metrics == {"kid_std_classifier": 0.05}  # untouched


def test_inpaint_cli_names_an_unreadable_checkpoint(tmp_path, digits_shards):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run([CLI, "inpaint", "--checkpoint", str(tmp_path / "bad.pt"), "--shards", digits_shards, "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith(f"ncsn-pipeline inpaint: error: {tmp_path / 'bad.pt'}:"), out.stderr
    assert "Traceback" not in out.stderr
