"""The `ncsn-pipeline` command line. Each command imports what it runs inside its own function, so `--help`, `--version`
and a bad option answer at once, without loading torch, Ray or MLflow."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ncsn._checks import first_line

if TYPE_CHECKING:  # the command imports it when it runs (see above)
    from pipelines.sample import SamplingOptions


def _toy_mixture(args: argparse.Namespace) -> int:
    from ncsn.figures import mixture_figure

    out = Path(args.output) / "mixture.png"
    shares = mixture_figure(out, learned=True)
    print(f"Figure 3 of the NCSN paper (learned scores): {out}")
    print("share of samples in the weight-0.2 mode: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return 0


def _shard(args: argparse.Namespace) -> int:
    from data_prep.manifest import ShardError
    from data_prep.shard import ShardOptions, shard_dataset, verify_shards
    from pipelines.cluster import connect_ray

    try:
        if args.verify:
            problems = verify_shards(args.verify)
            for line in problems:
                print(line)
            print(f"{args.verify}: " + (f"{len(problems)} shard(s) do not match the manifest" if problems else "every shard matches the manifest"))
            return 1 if problems else 0
        if args.source is None or args.output is None:
            raise ShardError("--source and --output are required (or --verify DIR)")
        input_path = args.input
        if input_path is None and args.download and args.source in ("cifar10", "mnist"):
            from data_prep.sources import download_with_torchvision

            input_path = str(download_with_torchvision(args.source, args.download))
        options = ShardOptions(source=args.source, input=input_path, shard_size=args.shard_size, max_shard_mb=args.max_shard_mb,
                               crop=args.crop, resize=args.resize, channels=args.channels)
        summary = shard_dataset(options, args.output, workers=args.workers, progress=not args.no_progress, connect=connect_ray)
    except _user_errors() as err:
        print(f"ncsn-pipeline shard: error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (printed as one line), not a bug."""
    from data_prep.manifest import ShardError
    from data_prep.sources import SourceError
    from data_prep.storage import StorageError
    from pipelines.cluster import ClusterError
    from pipelines.config import ConfigError
    from pipelines.evaluate import EvaluationError
    from pipelines.sample import SamplingError
    from pipelines.train import TrainingError
    from pipelines.tune.job import TuningError

    return (ClusterError, ConfigError, ShardError, SourceError, StorageError, SamplingError, EvaluationError, TrainingError,
            TuningError)


def _warn_if_job_scratch(run_dir: str) -> None:
    """A warning when ``run_dir`` is relative inside a submitted Ray job: it then lands in Ray's copy of the working
    directory (…/runtime_resources/working_dir_files/…), which goes with the cluster."""
    where = Path(run_dir).resolve()
    if not Path(run_dir).is_absolute() and "runtime_resources" in where.parts:
        logging.getLogger(__name__).warning("run_dir %s is relative, so this job writes to %s, Ray's copy of the working "
                                            "directory, which goes with the cluster: pass --set run_dir=/an/absolute/path on a "
                                            "disk that stays (and object storage for shards and checkpoints)", run_dir, where)


def _with_registration(cfg, args: argparse.Namespace):
    """``cfg`` with tracking.register_model from --register-model, when given."""
    return cfg.evolve({"tracking.register_model": args.register_model}) if args.register_model else cfg


def _preview(cfg, args: argparse.Namespace, evaluation: bool = False) -> int:
    """--print-config (the resolved config as YAML, the schedule included) or --dry-run (what would run): every check
    training (and with ``evaluation``, the final evaluation) makes before Ray starts, then nothing is started."""
    import yaml

    from pipelines.tracking import resume_preview, tracking_uri
    from pipelines.shards import local_shards
    from pipelines.train import prepare

    shards, local = args.shards or cfg.data.shards, local_shards(cfg)
    if shards is None and (local / "manifest.json").exists():
        shards = str(local)
    plan = prepare(cfg, shards) if shards else None
    if args.print_config:
        tree = cfg.to_dict()
        if plan:  # what the run will use, beside what the file says
            schedule = plan.schedule
            tree["resolved"] = {"shards": plan.shards, "storage_path": plan.storage, "sigmas": [round(s, 6) for s in schedule.sigmas],
                                "eps": schedule.eps, "steps_per_level": schedule.steps_per_level}
        print(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), end="")
        if not plan:
            print(f"# resolved: after sharding {cfg.data.source} into {local}")
        return 0
    print(plan.describe(cfg) if plan else f"shard {cfg.data.source} into {local} "
          f"first; the schedule is resolved from its manifest, then train {cfg.name!r} for {cfg.train.steps} steps")
    if plan and getattr(args, "resume", "fresh") != "fresh":  # train and run: the same-name check the real command makes
        resumes = resume_preview(cfg.evolve({"run_dir": str(Path(cfg.run_dir).resolve())}), plan.run_params(), args.resume == "accept")
        print(resumes or f"a new run {cfg.name!r}")
    if plan and evaluation:
        from pipelines.run import evaluation_request

        request = evaluation_request(cfg, plan.manifest)
        reference = request.reference_stats.describe() if request.reference_stats else f"the {request.reference_split} split"
        print(f"evaluate {cfg.sampling.num_samples} samples in the {request.convention.name} convention with {request.extractor} "
              f"features against {reference}")
    print(f"MLflow: {tracking_uri(cfg)}")
    print("dry run: the config and inputs are valid; nothing was started")
    return 0


def _tune_preview(cfg, args: argparse.Namespace) -> int:
    """`tune --dry-run`: the checks the tuning job makes before Ray starts, then its trials, search space and budget."""
    from pipelines.shards import local_shards
    from pipelines.tracking import tracking_uri
    from pipelines.tune.modes import SamplerSearch, ScheduleSearch
    from pipelines.sample import checkpoint_location

    shards = args.shards or cfg.data.shards or str(local_shards(cfg))
    mode = SamplerSearch(cfg, checkpoint_location(args.checkpoint)) if args.checkpoint else ScheduleSearch(cfg, shards)
    print(mode.describe())
    print(f"MLflow: {tracking_uri(cfg)}")
    print("dry run: the config and inputs are valid; nothing was started")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.lock import run_dir_lock
    from pipelines.shards import shards_for
    from pipelines.train import run_training

    try:
        cfg = _with_registration(load_config(args.config, args.set), args)
        if args.print_config or args.dry_run:
            return _preview(cfg, args)
        _warn_if_job_scratch(cfg.run_dir)
        with run_dir_lock(cfg.run_dir):
            result = run_training(cfg, shards_for(cfg, args.shards, progress=not args.no_progress), resume=args.resume)
    except _user_errors() as err:
        print(f"ncsn-pipeline train: error: {err}", file=sys.stderr)
        return 1
    print(f"trained {cfg.name} to step {result.metrics.get('step')}: loss {result.metrics.get('loss', float('nan')):.4f}; "
          f"checkpoint {result.model_file}; metrics {Path(cfg.run_dir).resolve() / 'metrics.jsonl'}")
    print(result.describe_choice())
    print(f"MLflow run {result.run.run_id} in {result.run.tracking_uri} — open it with: {ui_command(result.run.tracking_uri, result.run.run_id)}")
    print(next_sample_command(result.model_file, result.run.tracking_uri, result.model_uri(cfg.tracking.register_model)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.lock import run_dir_lock
    from pipelines.run import run_pipeline
    from pipelines.shards import shards_for

    try:
        cfg = _with_registration(load_config(args.config, args.set), args)
        if args.print_config or args.dry_run:
            return _preview(cfg, args, evaluation=True)
        _warn_if_job_scratch(cfg.run_dir)
        with run_dir_lock(cfg.run_dir):
            result = run_pipeline(cfg, shards_for(cfg, args.shards, progress=not args.no_progress), progress=not args.no_progress,
                                  resume=args.resume)
    except _user_errors() as err:
        print(f"ncsn-pipeline run: error: {err}", file=sys.stderr)
        return 1
    print(f"pipeline {cfg.name} done; everything is under {result.run_dir}")
    print(result.table())
    print(f"sample grid: {result.samples / 'grid.png'}")
    print(f"inpainting:  {result.inpainting}")
    print(f"checkpoint:  {result.checkpoint}")
    print(f"MLflow: parent run {result.parent_run_id}, training run {result.train_run_id} — {ui_command(result.tracking_uri, result.parent_run_id)}")
    print(next_sample_command(result.checkpoint, result.tracking_uri, result.model_uri))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.lock import run_dir_lock
    from pipelines.shards import shards_for
    from pipelines.tune.job import run_tuning

    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            return _tune_preview(cfg, args)
        if args.print_config:
            return _preview(cfg, args)
        _warn_if_job_scratch(cfg.run_dir)
        with run_dir_lock(cfg.run_dir):
            summary = run_tuning(cfg, shards_for(cfg, args.shards, progress=not args.no_progress), checkpoint=args.checkpoint)
    except _user_errors() as err:
        print(f"ncsn-pipeline tune: error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    print(f"results: {summary.best_config.parent / 'tune_results.csv'}; MLflow parent run {summary.parent_run_id} — "
          f"{ui_command(summary.tracking_uri, summary.parent_run_id)}")
    print(f"next: {summary.next_command}")
    return 0


def next_sample_command(checkpoint: Path, uri: str, model_uri: str) -> str:
    """What to run next: other samples of the chosen checkpoint, from its file or from MLflow (with the tracking URI that
    the MLflow form needs)."""
    sample = f"ncsn-pipeline sample --num-samples 100 --seed 1 --output {checkpoint.parent.parent / 'samples-seed1'} --checkpoint"
    return f"next: {sample} {checkpoint}\n  or from MLflow: MLFLOW_TRACKING_URI={uri} {sample} {model_uri}"


def ui_command(uri: str, run_id: str) -> str:
    """How to see a run's experiment in the MLflow UI, in its model-training view: MLflow 3's UI opens in its GenAI view
    unless the address (workflowType) or its toggle at the top left says otherwise."""
    from mlflow.tracking import MlflowClient

    try:
        page = f"#/experiments/{MlflowClient(uri).get_run(run_id).info.experiment_id}/runs?workflowType=machine_learning"
    except Exception:  # noqa: BLE001 — the store does not answer: the list of experiments, in the same view
        page = "#/experiments?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open http://127.0.0.1:5000/{page}"


def _sync_metrics(args: argparse.Namespace) -> int:
    from pipelines.tracking import METRICS_FILE, RUN_FILE, read_run_file, sync_metrics

    run_file = Path(args.run_dir) / RUN_FILE
    if not run_file.exists():
        print(f"ncsn-pipeline sync-metrics: error: {run_file} not found (is {args.run_dir} a training run directory?)", file=sys.stderr)
        return 1
    try:
        saved = read_run_file(run_file)
    except ValueError as err:
        print(f"ncsn-pipeline sync-metrics: error: {err}", file=sys.stderr)
        return 1
    uri = args.tracking_uri or saved["tracking_uri"]
    try:
        sent = sync_metrics(uri, saved["run_id"], Path(args.run_dir) / METRICS_FILE)
    except Exception as err:  # noqa: BLE001 — report the server problem in one line
        print(f"ncsn-pipeline sync-metrics: error: MLflow at {uri}: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
        return 1
    print(f"sent {sent} metric rows missing from MLflow run {saved['run_id']} ({uri})")
    return 0


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The ``sample`` command's arguments as the sampling job takes them."""
    from pipelines.sample import SamplingOptions

    return SamplingOptions(num_samples=args.num_samples, seed=args.seed, chunk_size=args.chunk_size, steps_per_level=args.steps_per_level,
                           eps=args.eps, sigmas=args.sigmas, denoise=not args.no_denoise,
                           trajectory_samples=min(8, args.chunk_size) if args.trajectory is None else args.trajectory,
                           sampler=args.sampler, sampler_steps=args.sampler_steps, corrector_steps=args.corrector_steps,
                           snr=args.snr, rho=args.rho, churn=args.churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise)


def _sample(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipelines.sample import run_sampling
    from pipelines.tracking import log_child_run

    options = sampling_options(args)
    try:
        summary = run_sampling(args.checkpoint, args.output, options, workers=args.workers, use_gpu=args.gpu, progress=not args.no_progress)
    except _user_errors() as err:
        print(f"ncsn-pipeline sample: error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    print(f"grid: {summary.output / 'grid.png'}")
    settings = summary.settings
    if not settings.mlflow_run_id or args.no_mlflow:
        return 0
    if not summary.chunks_done:
        print("nothing new was sampled, so nothing new is logged to MLflow")
    else:
        artifacts = {"samples": summary.output / "grid.png"}
        if (summary.output / "trajectory.png").exists():
            artifacts["trajectory"] = summary.output / "trajectory.png"
        metrics = {"sampling_samples_per_s": summary.samples_per_s, "sampling_nfe_per_s": summary.nfe_per_s}
        sampler = settings.schedule.sampler
        params = {"num_samples": str(settings.num_samples), "seed": str(settings.seed), "eps": f"{settings.schedule.eps:.6g}",
                  "steps_per_level": str(settings.schedule.steps_per_level), "num_levels": str(len(settings.schedule.sigmas)),
                  "output": str(summary.output), "nfe_per_image": str(settings.nfe_per_image),
                  **{f"sampler.{k}": str(v) for k, v in asdict(sampler).items()}}
        _said_logged(log_child_run(settings.tracking_uri, settings.mlflow_run_id, f"sample-{summary.output.name}", metrics,
                                   artifacts, step=settings.checkpoint_step, params=params), settings.mlflow_run_id, settings.tracking_uri)
    return 0


def _said_logged(child: str | None, parent: str, uri: str) -> None:
    """The lines a user needs after an ad-hoc command logged to a child of the checkpoint's training run."""
    if child:
        print(f"logged to MLflow run {child}, a child of the checkpoint's training run {parent} (MLFLOW_TRACKING_URI={uri})")


def _inpaint(args: argparse.Namespace) -> int:
    from data_prep.storage import local_path
    from ncsn.data import from_stored
    from pipelines.evaluate import read_first
    from pipelines.sample import run_inpainting
    from pipelines.tracking import log_child_run

    try:
        local_path(args.output, "--output")  # before any work
        x = from_stored(read_first(args.shards, args.split, args.num_images))
        out, settings = run_inpainting(args.checkpoint, x, args.mask, args.output, completions=args.completions, seed=args.seed,
                                       steps_per_level=args.steps_per_level, eps=args.eps, use_gpu=args.gpu,
                                       progress=not args.no_progress)
    except _user_errors() as err:
        print(f"ncsn-pipeline inpaint: error: {err}", file=sys.stderr)
        return 1
    print(f"inpainting grid (occluded | {args.completions} completions | original): {out}")
    if settings.mlflow_run_id and not args.no_mlflow:
        _said_logged(log_child_run(settings.tracking_uri, settings.mlflow_run_id, f"inpaint-{args.mask}", artifacts={"inpainting": out},
                                   step=settings.checkpoint_step, params={"mask": args.mask, "seed": str(args.seed)}),
                     settings.mlflow_run_id, settings.tracking_uri)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from data_prep.manifest import ShardError, load_manifest
    from data_prep.storage import StorageError, local_path
    from ncsn.atomic import atomic_write
    from pipelines.evaluate import Convention, EvaluationError, Evaluator, load_image_folder, load_reference_stats
    from pipelines.sample import SamplingError, load_samples, read_settings
    from pipelines.tracking import log_child_run

    if args.compare:
        return _compare_reports(args.compare)
    project_samples = args.samples is not None and (Path(args.samples) / "chunks").is_dir()
    try:
        if args.reference is None:
            raise EvaluationError("--reference is required (the shard set whose split is the reference)")
        if args.samples is None and args.save_stats is None:
            raise EvaluationError("--samples is required (unless --save-stats only writes the reference's statistics, "
                                  "or --compare reads two reports)")
        for option, value in (("--output", args.output), ("--save-stats", args.save_stats)):
            if value and not local_path(value, option).parent.is_dir():
                raise EvaluationError(f"{option} {value}: its directory {Path(value).parent} does not exist")
        convention = Convention(args.convention, args.is_splits, args.kid_subsets, args.kid_subset_size)
        stats = load_reference_stats(args.reference_stats) if args.reference_stats else None
        settings = read_settings(args.samples) if project_samples else None
        reference = None if project_samples or args.samples is None else load_manifest(args.reference)
        samples = (None if args.samples is None else load_samples(args.samples) if project_samples
                   else load_image_folder(args.samples, reference.channels, reference.image_shape[0]))
        if samples is not None:
            convention.check_counts(len(samples), None)
        evaluator = Evaluator(args.reference, args.feature_extractor, args.inception_weights, args.split,
                              Path(args.cache_dir) if args.cache_dir else None, args.resamples, use_gpu=args.gpu,
                              progress=not args.no_progress, convention=convention, reference_stats=stats)
        if args.save_stats:
            evaluator.save_stats(Path(args.save_stats))
            print(f"FID statistics of {evaluator.describe_reference()} ({args.feature_extractor} features, weights "
                  f"{evaluator.extractor_id}) written to {args.save_stats}")
        if samples is None:
            return 0
        report = evaluator.report(samples, 0 if args.no_baselines else len(samples), seed=args.seed)
    except (EvaluationError, SamplingError, ShardError, StorageError) as err:
        print(f"ncsn-pipeline evaluate: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.output) if args.output else Path(args.samples) / f"metrics_{args.feature_extractor}{'_published' if args.convention == 'published' else ''}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report.record(), indent=1)))  # replaces a link, never writes through it
    spread = f"fid and is_1split ±sd from {args.resamples} bootstrap resamples" if args.convention == "project" else "as papers report them"
    print(f"{len(samples)} samples vs {evaluator.describe_reference()}: {args.feature_extractor} features ({spread}):")
    print(report.table())
    print(f"written to {out}")
    uri = args.tracking_uri or (settings.tracking_uri if settings else None)
    run_id = args.run_id or (settings.mlflow_run_id if settings else None)
    if uri and run_id:
        _said_logged(log_child_run(uri, run_id, f"evaluate-{args.feature_extractor}{'-published' if args.convention == 'published' else ''}", report.flat(), {"evaluation": out},
                                   step=settings.checkpoint_step if settings else 0,
                                   params={f"evaluation.{args.feature_extractor}_id": evaluator.extractor_id, "samples": str(args.samples),
                                           "reference": evaluator.describe_reference()}, tags=report.tags()), run_id, uri)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    import json
    import os

    from data_prep.storage import StorageError, local_path
    from pipelines.reproduce import EXPERIMENTS, check_experiments, log_to_mlflow, reproduce

    try:
        check_experiments(args.only or ())
    except ValueError as err:
        print(f"ncsn-pipeline reproduce: error: --only: {err}", file=sys.stderr)
        return 1
    try:
        out = local_path(args.out, "--out")
        if args.checkpoint and not Path(args.checkpoint).is_file():
            raise StorageError(f"--checkpoint {args.checkpoint}: no such file (a checkpoint.pt of a digits model)")
    except StorageError as err:
        print(f"ncsn-pipeline reproduce: error: {err}", file=sys.stderr)
        return 1
    results = reproduce(out, quick=args.quick, checkpoint=args.checkpoint, only=args.only or EXPERIMENTS)
    for figure, numbers in results.items():
        shown = {k: v for k, v in numbers.items() if k != "png" and not isinstance(v, list)}
        print(f"{figure:<26} {out / numbers['png']}  {json.dumps(shown, default=float)[:160]}")
    print(f"numbers in {out / 'results.json'}")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        print(f"logged to MLflow run {log_to_mlflow(uri, out, results)} in {uri}")
    return 0


def _compare_reports(paths: list[str]) -> int:
    """Two or more JSON reports side by side (the model's numbers), with the card fields on which they differ flagged."""
    import json

    from pipelines.evaluate import Evaluation, card_lines, compare_cards

    models = {}
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
            models[path] = Evaluation.from_record(record["model"])
        except (OSError, ValueError, TypeError, KeyError) as err:
            print(f"ncsn-pipeline evaluate: error: --compare {path}: not a report written by `ncsn-pipeline evaluate` "
                  f"({type(err).__name__}: {first_line(err, 160)})", file=sys.stderr)
            return 1
    for path, model in models.items():
        print(f"{path}:")
        print("\n".join(card_lines(model.card())))
        print("\n".join(f"  {k:<28} {v:.6g}" for k, v in model.flat().items()))
    differ = compare_cards({path: model.card() for path, model in models.items()})
    if differ:
        print("NOT COMPARABLE: the cards differ in")
        print("\n".join(f"  {line}" for line in differ))
    else:
        print("comparable: the cards agree (the same convention, extractor weights, reference, counts, splits and subsets)")
    return 0


CHECKPOINT_HELP = ("a checkpoint.pt written by training (a path or an s3:// / gs:// URL), a training run directory (its "
                   "model/checkpoint.pt), or the MLflow model training logged: runs:/RUN_ID/model or models:/NAME/VERSION "
                   "(the server from $MLFLOW_TRACKING_URI)")

EXAMPLES = {
    "shard": "  ncsn-pipeline shard --source digits --output runs/digits/shards/digits\n"
             "  ncsn-pipeline shard --source cifar10 --input cifar-10-python.tar.gz --output s3://bucket/shards/cifar10\n"
             "  ncsn-pipeline shard --verify s3://bucket/shards/cifar10",
    "train": "  ncsn-pipeline train --config configs/digits.yaml\n"
             "  ncsn-pipeline train --config configs/cifar10.yaml --set cluster.num_workers=8 --set cluster.storage_path=s3://bucket/ray\n"
             "  ncsn-pipeline train --config configs/digits.yaml --set train.steps=5000 --resume   # continue with more steps",
    "run": "  ncsn-pipeline run --config configs/digits.yaml\n"
           "  ncsn-pipeline run --config configs/digits.yaml --dry-run\n"
           "  ncsn-pipeline run --config configs/digits.yaml --print-config",
    "tune": "  ncsn-pipeline tune --config configs/digits.yaml\n"
            "  ncsn-pipeline tune --config configs/digits.yaml --checkpoint runs/digits/model/checkpoint.pt   # sampler only",
    "sample": "  ncsn-pipeline sample --checkpoint runs/digits/model/checkpoint.pt --num-samples 1000 --output runs/digits/samples1k\n"
              "  ncsn-pipeline sample --checkpoint runs/digits --num-samples 100 --output runs/digits/samples100   # a run directory\n"
              "  ncsn-pipeline sample --checkpoint models:/ncsn-digits/1 --num-samples 100 --output samples   # $MLFLOW_TRACKING_URI's registry",
    "inpaint": "  ncsn-pipeline inpaint --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits "
               "--output runs/digits/inpaint --mask half",
    "reproduce": "  ncsn-pipeline reproduce --out runs/lecture\n"
                 "  ncsn-pipeline reproduce --out runs/lecture --quick --checkpoint runs/digits/model/checkpoint.pt",
    "evaluate": "  ncsn-pipeline evaluate --samples runs/digits/samples1k --reference runs/digits/shards/digits\n"
                "  ncsn-pipeline evaluate --samples other_model_pngs/ --reference runs/digits/shards/digits --output other.json\n"
                "  ncsn-pipeline evaluate --samples runs/cifar10/samples --reference shards/cifar10 --split train+validation "
                "--convention published --feature-extractor inception --inception-weights weights-inception-2015-12-05-6726825d.pth\n"
                "  ncsn-pipeline evaluate --samples runs/cifar10/samples --reference shards/cifar10 --convention published "
                "--feature-extractor inception --reference-stats cifar10-32x32.npz   # FID against published statistics\n"
                "  ncsn-pipeline evaluate --compare a/metrics_inception_published.json b/metrics_inception_published.json",
}


def _config_command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A subcommand that runs a YAML config: --config, --set overrides, --shards, --no-progress."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/digits.yaml (tuning ranges: its `tune:` section)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. optim.lr=2e-4 (repeatable)")
    parser.add_argument("--shards", help="use this shard directory instead of sharding the configured source")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (the σ schedule included) and exit")
    parser.add_argument("--dry-run", action="store_true", help="check the config and inputs, say what would run, and exit")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="ncsn-pipeline", description="NCSN score-based generative models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray Train's per-report lines")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('ncsn-pipeline')}")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy-mixture", help="the 2-D toy of NCSN Figure 3 (about 10 s): a DSM-trained score network on a "
                                             "Gaussian mixture, Langevin vs annealed Langevin")
    toy.add_argument("--output", default="runs/toy-mixture", help="directory for the figure (default: runs/toy-mixture)")
    toy.set_defaults(func=_toy_mixture)

    shard = sub.add_parser("shard", help="write an image data set as WebDataset tar shards with a Ray job")
    shard.add_argument("--source", choices=["digits", "cifar10", "mnist", "image-folder"])
    shard.add_argument("--input", help="cifar-10-python.tar.gz, the MNIST idx directory, or the image folder")
    shard.add_argument("--output", help="directory or fsspec URL (s3://…) for the shards and manifest.json")
    shard.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    shard.add_argument("--max-shard-mb", type=float, help="also start a new shard past this many MB")
    shard.add_argument("--workers", type=int, help="shard tasks at once (default: the cluster's CPUs)")
    shard.add_argument("--crop", type=int, help="image-folder: centre crop to this square size first (CelebA: 140)")
    shard.add_argument("--resize", type=int, help="image-folder: resize to this square size (CelebA: 64)")
    shard.add_argument("--channels", type=int, choices=[1, 3], default=3, help="image-folder: 1 (grey) or 3 (RGB)")
    shard.add_argument("--download", metavar="CACHE_DIR", help="cifar10/mnist without --input: fetch through torchvision into CACHE_DIR (needs internet)")
    shard.add_argument("--verify", metavar="DIR", help="re-hash the shards in DIR against its manifest and report mismatches")
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")
    shard.set_defaults(func=_shard)

    for command in (_config_command(sub, "train", _train, "train an NCSN as a Ray Train job (local Ray, or the cluster in RAY_ADDRESS)"),
                    _config_command(sub, "run", _run, "the whole pipeline: shard → train → sample → inpaint → evaluate, tracked in MLflow")):
        command.add_argument("--register-model", metavar="NAME", help="also register the final model in MLflow's model registry "
                                                                      "as NAME (the config's tracking.register_model)")
        again = command.add_mutually_exclusive_group()
        again.add_argument("--resume", dest="resume", action="store_const", const="accept", default="auto",
                           help="continue the run of this name although its settings changed (default: resume only "
                                "with the same settings, else stop and list the differences)")
        again.add_argument("--fresh", dest="resume", action="store_const", const="fresh",
                           help="start the run of this name anew; the previous one is moved to <run_dir>/previous-<time>")
    tune = _config_command(sub, "tune", _tune, "tune the σ schedule and the sampler with Ray Tune (ASHA + Optuna), resumable")
    tune.add_argument("--checkpoint", help="sampler-only mode: tune ε, T and a sub-schedule for this trained model; " + CHECKPOINT_HELP)

    sample = sub.add_parser("sample", help="samples from a checkpoint on parallel Ray actors (resumable), with its own sampler or another")
    sample.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    sample.add_argument("--num-samples", type=int, required=True)
    sample.add_argument("--output", required=True, help="directory: images/NNNNNN.png, chunks/*.npz, grid.png, sampling.json")
    sample.add_argument("--workers", type=int, default=2, help="Ray actors, each holding the model once (default 2)")
    sample.add_argument("--seed", type=int, default=0, help="samples depend on (seed, chunk) only, not on --workers")
    sample.add_argument("--chunk-size", type=int, default=100, help="samples per chunk: the unit of work and of resumption")
    sample.add_argument("--steps-per-level", type=int, help="Langevin steps T per σ level (default: the training config's)")
    sample.add_argument("--eps", type=float, help="Langevin step ε (default: the training run's)")
    sample.add_argument("--sigmas", type=float, nargs="+", help="sample with this σ schedule instead of the checkpoint's")
    sample.add_argument("--no-denoise", action="store_true", help="skip the final denoising step x + σ_L² s(x, σ_L)")
    sample.add_argument("--sampler", help="als: annealed Langevin (NCSN Algorithm 1); pc: predictor–corrector "
                        "(score_sde); euler, heun: EDM's probability-flow ODE solvers (default: the checkpoint's)")
    sample.add_argument("--sampler-steps", type=int, metavar="N", help="pc, euler, heun: σ grid size (default: the model's levels)")
    sample.add_argument("--corrector-steps", type=int, metavar="M", help="pc: Langevin corrector steps per level (0: predictor only)")
    sample.add_argument("--snr", type=float, help="pc: the corrector's target signal-to-noise ratio")
    sample.add_argument("--rho", type=float, help="euler, heun: EDM's grid exponent ρ")
    sample.add_argument("--churn", type=float, help="heun: EDM Algorithm 2's S_churn (arch ncsnv2 only)")
    sample.add_argument("--s-tmin", type=float, help="heun with churn: churn only σ >= S_tmin")
    sample.add_argument("--s-tmax", type=float, help="heun with churn: churn only σ <= S_tmax (inf: no upper bound)")
    sample.add_argument("--s-noise", type=float, help="heun with churn: the churn noise's scale S_noise")
    sample.add_argument("--trajectory", type=int, metavar="K",
                        help="write trajectory.png for K samples (0: none; default 8, or the chunk size when smaller)")
    sample.add_argument("--gpu", action="store_true", help="one GPU per actor")
    sample.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (default: a child run of the checkpoint's training run)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")
    sample.set_defaults(func=_sample)

    paint = sub.add_parser("inpaint", help="complete occluded test images (NCSN Figure 6)")
    paint.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    paint.add_argument("--shards", required=True, help="shard directory or URL whose images to occlude")
    paint.add_argument("--split", default="test", help="which split's images (default %(default)s)")
    paint.add_argument("--mask", choices=["centre", "half", "random"], default="centre",
                       help="centre square, right half, or 50%% random pixels unknown (default %(default)s)")
    paint.add_argument("--num-images", type=int, default=8, help="images to occlude, the split's first (default %(default)s)")
    paint.add_argument("--completions", type=int, default=4, help="completions per image, different seeds (default %(default)s)")
    paint.add_argument("--output", required=True, help="directory for inpainting_<mask>.png")
    paint.add_argument("--seed", type=int, default=0, help="seed of the mask and of the first completion (default %(default)s)")
    paint.add_argument("--steps-per-level", type=int, help="T, Langevin steps per σ level (default: the checkpoint's)")
    paint.add_argument("--eps", type=float, help="Langevin step size ε (default: the checkpoint's)")
    paint.add_argument("--gpu", action="store_true", help="run the inpainting actor on a GPU")
    paint.add_argument("--no-mlflow", action="store_true", help="do not log the grid to MLflow (default: a child run of the checkpoint's training run)")
    paint.add_argument("--no-progress", action="store_true", help="no progress bar")
    paint.set_defaults(func=_inpaint)

    ev = sub.add_parser("evaluate", help="KID / FID / Inception Score, with intervals and baselines, of a sample set")
    ev.add_argument("--samples",
                    help="a directory written by `ncsn-pipeline sample`, or any folder of PNG/JPEG images of the reference's size")
    ev.add_argument("--reference", help="shard directory or URL (its --split is the reference)")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test", "train+validation"),
                    help="reference split (default %(default)s; tuning selects on validation, so judge on test; papers on "
                         "CIFAR-10 compare with the whole official training set: train+validation)")
    ev.add_argument("--convention", choices=("project", "published"), default="project",
                    help="project: KID with a 95%% interval, FID and one-split IS with bootstrap sds; published: FID, IS over "
                         "splits, KID over subsets, as papers and torch-fidelity report them (default %(default)s)")
    ev.add_argument("--reference-stats", metavar="FILE.npz", help="FID against these published statistics (mu, sigma: "
                    "pytorch-fid, TTUR, EDM, or --save-stats files); published convention")
    ev.add_argument("--save-stats", metavar="FILE.npz", help="write the reference's FID statistics (mu, sigma) here, to share them")
    ev.add_argument("--is-splits", type=int, default=10, help="published: IS over this many splits (default %(default)s)")
    ev.add_argument("--kid-subsets", type=int, default=100, help="published: KID over this many subsets (default %(default)s)")
    ev.add_argument("--kid-subset-size", type=int, default=1000, help="published: … of this many rows (default %(default)s)")
    ev.add_argument("--compare", nargs="+", metavar="REPORT.json", help="print these reports side by side, flagging the card "
                    "fields (convention, extractor, reference, counts) on which they differ; nothing is computed")
    ev.add_argument("--feature-extractor", choices=["classifier", "inception"], default="classifier",
                    help="a classifier trained on the shards' labels, or Inception-v3 (default %(default)s)")
    ev.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's Inception weights file, for machines without internet")
    ev.add_argument("--resamples", type=int, default=200, help="bootstrap resamples behind FID's and IS's sd (default %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the baselines' draws (default %(default)s)")
    ev.add_argument("--cache-dir", help="classifier weights, reference features, baselines (default $NCSN_CACHE or ~/.cache/ncsn-pipeline)")
    ev.add_argument("--no-baselines", action="store_true", help="skip the baselines (held-out real images, a fitted Gaussian)")
    ev.add_argument("--output", metavar="FILE", help="where the JSON report goes (default <samples>/metrics_<extractor>.json; …_published.json in the published convention)")
    ev.add_argument("--tracking-uri", help="the MLflow store of --run-id (default: the one the checkpoint was trained with)")
    ev.add_argument("--run-id", help="log to a child run of this MLflow run (default: of the checkpoint's training run)")
    ev.add_argument("--gpu", action="store_true", help="extract features on a GPU")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars (classifier training, feature extraction)")
    ev.set_defaults(func=_evaluate)

    rep = sub.add_parser("reproduce", help="every result of the lecture that runs on a CPU, as PNGs and results.json")
    rep.add_argument("--out", required=True, help="directory for the figures (<figure id>.png) and results.json")
    rep.add_argument("--quick", action="store_true", help="small settings (a few minutes on 2 cores; the tests' setting)")
    rep.add_argument("--checkpoint", help="a digits checkpoint.pt for the samples, trajectory and inpainting (default: train one here)")
    rep.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these (gaussian-sm-mle, ica-error, ica-misspecified, "
                     "overcomplete, manifold-ssm, low-density-scores, mixture-langevin, digits); results.json keeps the others' numbers")
    rep.add_argument("--tracking-uri", help="also log every figure and number as one MLflow run (default $MLFLOW_TRACKING_URI)")
    rep.set_defaults(func=_reproduce)

    sync = sub.add_parser("sync-metrics", help="send metrics.jsonl rows that an unreachable MLflow server missed")
    sync.add_argument("run_dir", help="the training run directory (holds metrics.jsonl and mlflow_run.json)")
    sync.add_argument("--tracking-uri", help="send to this server instead of the one the run was started with")
    sync.set_defaults(func=_sync_metrics)
    for name, command in sub.choices.items():
        if name in EXAMPLES:  # shown under each command's --help
            command.epilog, command.formatter_class = "examples:\n" + EXAMPLES[name], argparse.RawDescriptionHelpFormatter
    for command in sub.choices.values():  # -v after the subcommand too (SUPPRESS: keeps a -v given before it)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _loopback_ray() -> bool:
    """True when this command's Ray is on this machine's loopback: a local instance (no RAY_ADDRESS) or a head on
    127.0.0.1 (infra/local-cluster.sh's). Ray then keeps every address on 127.0.0.1 instead of the host's."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        return True
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1")


def _interrupt(signum: int, frame) -> None:
    """SIGTERM stops a command as Ctrl-C does: its MLflow runs end KILLED and the same command resumes."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if _loopback_ray():  # Ray reads this once, on import (pipelines/cluster.py)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):  # MLflow's download bars too (a runs:/ or models:/ checkpoint)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the object-store clients announce every credential and endpoint lookup at INFO
        for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each bounded HTTP retry; the error names the server
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"ncsn-pipeline {args.command}: interrupted; any MLflow run it had open is marked KILLED, and the same command resumes",
              file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"ncsn-pipeline {args.command}: error: no space left on the device of {err.filename or 'a file it writes'}; "
              "free space and run the same command (what was written whole is kept)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
