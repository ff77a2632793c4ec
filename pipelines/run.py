"""The whole pipeline for one config: shard (skipped when up to date) → train → sample → inpaint → evaluate.
Every output lands under the run directory; MLflow gets a parent run "<name>-pipeline" whose child is the
training run (which also holds the samples and the metrics), and a summary table."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import ray

from ncsn.atomic import atomic_write
from ncsn.data import from_stored

from pipelines import tracking
from pipelines.config import Config
from data_prep.manifest import Manifest, load_manifest
from data_prep.storage import absolute_location
from pipelines.evaluate import (Convention, EvaluationRequest, Report, check_reference_stats, evaluate_on_worker, load_reference_stats,
                                 read_first, split_count)
from pipelines.sample import SamplingOptions, load_samples, open_checkpoint, run_inpainting, run_sampling
from pipelines.cluster import connect_ray
from pipelines.train import check_tracking, run_training, set_aside_previous_run

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_dir: Path
    checkpoint: Path
    samples: Path
    inpainting: Path
    metrics: dict[str, float]
    evaluation: Report
    tracking_uri: str
    parent_run_id: str
    train_run_id: str
    choice: str  # which checkpoint was sampled and evaluated, and why
    model_uri: str  # the checkpoint's model in MLflow

    def table(self) -> str:
        """Which checkpoint, the evaluation table (its card, then the metrics of model and baselines), then the run's other
        numbers."""
        rest = {**self.evaluation.extractor, **{k: v for k, v in self.metrics.items() if k not in self.evaluation.flat()}}
        width = max(len(k) for k in rest)
        return (f"  {self.choice}\n" + self.evaluation.table() + "\n" +
                "\n".join(f"  {k:<{width}}  {v:.4g}" for k, v in rest.items()))


def evaluation_request(cfg: Config, manifest: Manifest) -> EvaluationRequest:
    """The final evaluation's inputs, checked on the driver before any work: the reference split and its count, the
    statistics file (read once, shipped to the evaluating worker)."""
    e = cfg.evaluation
    convention = Convention(e.convention, e.is_splits, e.kid_subsets, e.kid_subset_size)
    stats = load_reference_stats(e.reference_stats) if e.reference_stats else None
    if stats is not None:
        check_reference_stats(stats, e.feature_extractor)
    count = split_count(manifest, e.reference_split)
    if stats is None:
        convention.check_counts(None, count)
    return EvaluationRequest(manifest.location, e.feature_extractor, e.reference_split, convention, stats, str(cfg.eval_cache_dir()),
                             e.resamples, cfg.cluster.use_gpu)


def run_pipeline(cfg: Config, shards: str, progress: bool = True, resume: str = "auto") -> PipelineResult:
    """Train, sample, inpaint and evaluate for ``cfg`` on ``shards``; see the module docstring (``resume``: as for
    run_training)."""
    manifest = load_manifest(absolute_location(shards))  # read once: for the evaluation's plan, training, inpainting's images
    request = evaluation_request(cfg, manifest)
    run_dir = Path(cfg.run_dir).resolve()
    cfg = cfg.evolve({"run_dir": str(run_dir)})
    if resume == "fresh":  # the previous runs set aside here, training starts anew by itself
        set_aside_previous_run(cfg, cfg.cluster.storage_path or str(run_dir / "ray"))
    connect_ray()  # the tracking store must reach every host Ray may use, before the parent run is opened in it
    check_tracking(tracking.tracking_uri(cfg), ray.nodes(), cfg.cluster.shared_filesystem)
    # the parent run's own record, beside (not in) the training run's
    pipeline_cfg = cfg.evolve({"name": f"{cfg.name}-pipeline", "run_dir": str(run_dir / "pipeline"),
                               "tracking.tracking_uri": tracking.tracking_uri(cfg)})
    uri, parent = tracking.open_run(pipeline_cfg, {"data.shards": shards}, accept_changes=resume == "accept")
    cfg = cfg.evolve({"tracking.tracking_uri": uri})
    try:
        log.info("stage 1/5: shards ready in %s (written by the shard step, or already up to date)", shards)
        log.info("stage 2/5: training %s", cfg.name)
        trained = run_training(cfg, manifest, parent_run_id=parent, resume="auto" if resume == "fresh" else resume)
        checkpoint, source = trained.model_file, open_checkpoint(trained.model_file)  # read once, for sampling and inpainting

        log.info("stage 3/5: sampling %d images on %d Ray actors", cfg.sampling.num_samples, cfg.sampling.workers)
        options = SamplingOptions(cfg.sampling.num_samples, seed=cfg.train.seed, chunk_size=cfg.sampling.chunk_size,
                                  denoise=cfg.sampling.denoise, trajectory_samples=min(8, cfg.sampling.chunk_size))
        samples = run_sampling(source, run_dir / "samples", options, workers=cfg.sampling.workers, use_gpu=cfg.cluster.use_gpu,
                               progress=progress)

        log.info("stage 4/5: inpainting")
        inpainting, _ = run_inpainting(source, from_stored(read_first(manifest, "test", 8)), "centre",
                                       run_dir / "inpainting", completions=4, seed=cfg.train.seed, use_gpu=cfg.cluster.use_gpu,
                                       progress=progress)

        log.info("stage 5/5: evaluating with %s features on a Ray worker (%s convention)", cfg.evaluation.feature_extractor,
                 cfg.evaluation.convention)
        report = evaluate_on_worker(request, load_samples(samples.output), cfg.evaluation.inception_weights,
                                    baseline_samples=cfg.sampling.num_samples, seed=cfg.train.seed, num_cpus=cfg.cluster.cpus_per_worker)
        metrics = {**report.flat(), "final_loss": trained.metrics.get("loss", float("nan")), "sampling_samples_per_s": samples.samples_per_s}
    except BaseException as err:
        tracking.finish_run(uri, parent, tracking.ended_by(err))
        raise
    choice = trained.describe_choice() + (" — chosen on the validation split, judged below on the test split, which the "
                                          "choice never saw" if trained.best else "")
    atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps({**metrics, "checkpoint": choice, "evaluation": report.record()},
                                                                                 indent=1)))
    result = PipelineResult(run_dir, checkpoint, samples.output, inpainting, metrics, report, uri, parent, trained.run.run_id, choice,
                            trained.model_uri(cfg.tracking.register_model))
    atomic_write(run_dir / "summary.txt", lambda tmp: tmp.write_text(result.table() + "\n"))
    artifacts = {"summary": run_dir / "summary.txt", "samples": samples.output / "grid.png", "inpainting": inpainting}
    if (samples.output / "trajectory.png").exists():
        artifacts["trajectory"] = samples.output / "trajectory.png"
    params = {f"evaluation.{report.model.extractor}_id": report.model.extractor_id}
    tracking.log_to_run(uri, trained.run.run_id, metrics, {k: v for k, v in artifacts.items() if k != "summary"}, step=int(trained.metrics.get("step", 0)),
                        params=params, tags=report.tags())
    tracking.log_to_run(uri, parent, metrics, artifacts, params=params, tags=report.tags())
    tracking.finish_run(uri, parent)
    return result
