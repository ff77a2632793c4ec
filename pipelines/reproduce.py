"""`ncsn-pipeline reproduce`: every result of the lecture that runs on a CPU, drawn into one directory with the numbers
that show each holds (results.json), and logged as one MLflow run when a tracking URI is given. The math is ncsn's
(classical, lecture, experiments, sampling); this module runs it at the chosen size and records it."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.sources import DigitsSource
from ncsn import figures, lecture
from ncsn.atomic import atomic_write
from ncsn.checkpoint import load_checkpoint
from ncsn.classical import gaussian_score_matching
from ncsn.experiments import paper_mixture
from ncsn.images import save_image_grid, save_trajectory_strip
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sampling import inpaint, sample_images
from ncsn.sigmas import recommend_schedule
from ncsn.train import fit

log = logging.getLogger(__name__)
FIGURES = ("gaussian-sm-mle", "ica-error", "ica-misspecified", "overcomplete-filters", "overcomplete-dot-products", "manifold-ssm",
           "low-density-scores", "mixture-langevin", "annealed-trajectory", "inpainting", "samples")
# Settings measured to give recognisable digits in about 2½ minutes on 2 CPU cores (tests/test_digits_quality.py).
DIGITS = dict(arch="ncsnv2", ngf=16, steps=2500, batch_size=64, lr=1e-3, grad_clip=10.0, ema_decay=0.995, steps_per_level=10)


@dataclass(frozen=True)
class Size:
    """How large each experiment is run: ``quick`` (minutes, for the tests) or the full setting."""

    ica_sizes: tuple[int, ...]
    ica_reps: int
    patches: int
    ica_steps: int
    ssm_steps: int
    density_steps: int
    mixture_samples: int
    digits_steps: int


QUICK = Size((316, 1000, 3162, 10000, 31623), 5, 8000, 300, 1200, 1500, 1000, 400)
FULL = Size((316, 1000, 3162, 10000, 31623, 100000), 10, 50000, 1000, 3000, 3000, 5000, DIGITS["steps"])
LAPLACE_FRACTION = 0.5  # the misspecification: half of the source values Laplace instead of logistic (equal variance)


def digits_images() -> torch.Tensor:
    """The digits' training split as uint8 (N, 1, 8, 8)."""
    source = DigitsSource()
    return torch.from_numpy(np.stack([r.image for r in source.read("train", 0, source.count("train"))])).permute(0, 3, 1, 2).contiguous()


def train_digits(steps: int = DIGITS["steps"], seed: int = 0):
    """Train the digits NCSN in this process; return (EMA model, schedule recommendation)."""
    images = digits_images()
    schedule = recommend_schedule(images.float() / 255, steps_per_level=DIGITS["steps_per_level"])
    torch.manual_seed(seed)  # the initial weights: makes the run (and the quality test) repeatable
    model = ScoreNetwork(ModelConfig(DIGITS["arch"], 8, 1, DIGITS["ngf"]), schedule.sigmas())
    ema = fit(images, model, schedule.sigmas(), num_steps=steps, batch_size=DIGITS["batch_size"], lr=DIGITS["lr"],
              grad_clip=DIGITS["grad_clip"], ema_decay=DIGITS["ema_decay"], seed=seed, log_every=250)
    return ema.model, schedule.schedule()


def _gaussian(out: Path, n: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64, generator=gen)
    x = torch.randn(n, 4, dtype=torch.float64, generator=gen) @ a.T + torch.arange(4.0, dtype=torch.float64)
    mu, precision = gaussian_score_matching(x)
    centred = x - x.mean(0)
    mle_precision = torch.linalg.inv(centred.T @ centred / n)
    figures.scatter_figure({"μ": (x.mean(0).tolist(), mu.tolist()), "precision": (mle_precision.flatten().tolist(), precision.flatten().tolist())},
                           out, "maximum likelihood", "score matching")
    return {"max_abs_difference_mu": float((mu - x.mean(0)).abs().max()),
            "max_abs_difference_precision": float((precision - mle_precision).abs().max()), "n": n}


def _ica(out: Path, size: Size, laplace_fraction: float) -> dict:
    curves = lecture.ica_error_curves(list(size.ica_sizes), size.ica_reps, laplace_fraction=laplace_fraction)
    title = "basic ICA, 4 logistic sources" if not laplace_fraction else f"misspecified: {laplace_fraction:.0%} of source values Laplace"
    figures.ica_error_figure(curves, out, title)
    return {"slopes": curves.slopes(), "last_ratios": curves.last_ratios(), "sizes": curves.sizes, "reps": size.ica_reps,
            "score_matching": curves.score_matching, "maximum_likelihood": curves.maximum_likelihood, "laplace_fraction": laplace_fraction}


def _overcomplete(out_filters: Path, out_dots: Path, size: Size, patch: int = 8) -> tuple[dict, dict]:
    from sklearn.datasets import load_sample_images  # two bundled photographs: the offline natural images

    gen = torch.Generator().manual_seed(0)
    z, v = lecture.whiten(lecture.image_patches(load_sample_images().images, patch, size.patches, gen))
    fit = lecture.overcomplete_ica(z, 2 * z.shape[1], size.ica_steps)
    figures.filters_figure(fit.w @ v, out_filters, patch)  # pixel-space filters: the whitened w_k through V
    dots = lecture.max_dot_products(fit.w)
    figures.dot_products_figure(dots, out_dots)
    return ({"m": len(fit.w), "p": z.shape[1], "patch_size": patch, "patches": size.patches, "steps": size.ica_steps,
             "objective_start": fit.objective_start, "objective_end": fit.objective_end,
             "alpha_range": [float(fit.alpha.min()), float(fit.alpha.max())]},
            {"median_max_dot": float(dots.median()), "fraction_above_0.95": float((dots > 0.95).float().mean())})


def _manifold(out: Path, size: Size) -> dict:
    data = lecture.manifold_data(10000)
    curves = {"no noise": lecture.ssm_loss_curve(data, 0.0, size.ssm_steps), "N(0, 0.0001) noise": lecture.ssm_loss_curve(data, 0.01, size.ssm_steps)}
    figures.ssm_loss_figure(curves, out)
    spread = {name: float(np.std(losses[-len(losses) // 5:])) for name, losses in curves.items()}
    return {"sd_last_fifth_no_noise": spread["no noise"], "sd_last_fifth_noise": spread["N(0, 0.0001) noise"],
            "ratio": spread["no noise"] / spread["N(0, 0.0001) noise"], "data": "2-D torus in 16-D", "steps": size.ssm_steps}


def _low_density(out: Path, size: Size) -> dict:
    field = lecture.low_density_scores(steps=size.density_steps)
    figures.score_field_figure(field, out)
    return {**field.error_by_density(), "steps": size.density_steps}


def _mixture(out: Path, size: Size) -> dict:
    shares = figures.mixture_figure(out, n=size.mixture_samples)  # the weight of the (−5, −5) mode in each panel
    return {"exact": shares["exact sampling"], "langevin": shares["Langevin dynamics"], "annealed": shares["annealed Langevin"],
            "true": float(paper_mixture().weights[0])}


def _digits(directory: Path, size: Size, checkpoint: str | None) -> dict[str, dict]:
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        model, schedule, source = ckpt.build_model().eval(), ckpt.schedule, checkpoint
    else:
        log.info("training a digits NCSN for %d steps in this process", size.digits_steps)
        model, schedule = train_digits(size.digits_steps)
        source = f"trained here for {size.digits_steps} steps"
    gen = torch.Generator().manual_seed(0)
    every = max(1, len(schedule.sigmas) * schedule.steps_per_level // 10)
    result = sample_images(model, (100, 1, 8, 8), schedule, trajectory_every=every, generator=gen, levels_only=model.levels_only)
    save_image_grid(result.samples, directory / "samples.png", nrow=10, scale=4)
    save_trajectory_strip(result.trajectory, directory / "annealed-trajectory.png", num_samples=8, scale=4)
    images = digits_images()[:8].float() / 255
    mask = torch.ones_like(images)
    mask[..., :, 4:] = 0  # the right half is unknown
    filled = torch.cat([inpaint(model, images, mask, schedule.tensor(), schedule.eps, schedule.steps_per_level, generator=gen)
                        for _ in range(3)])
    save_image_grid(torch.cat([images * mask, filled, images]), directory / "inpainting.png", nrow=8, scale=4)
    nfe = len(schedule.sigmas) * schedule.steps_per_level + int(schedule.denoise)
    return {"samples": {"model": source, "nfe_per_image": nfe, "count": 100},
            "annealed-trajectory": {"model": source, "snapshots": len(result.trajectory)},
            "inpainting": {"model": source, "rows": "occluded, three completions, original", "known": "left half"}}


EXPERIMENTS = ("gaussian-sm-mle", "ica-error", "ica-misspecified", "overcomplete", "manifold-ssm", "low-density-scores",
               "mixture-langevin", "digits")  # what reproduce runs; "overcomplete" and "digits" draw several figures


def check_experiments(only: Collection[str]) -> None:
    """A ValueError naming the names in ``only`` that are no experiment."""
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")


def reproduce(out: Path, quick: bool = False, checkpoint: str | None = None, only: Collection[str] = EXPERIMENTS) -> dict[str, dict]:
    """Run the experiments ``only`` names (default all), drawing each figure into ``out`` (one PNG per figure id), and
    record their numbers in ``out/results.json`` beside those of figures drawn there before; returns what was run:
    {figure id: {"png": …, numbers}}."""
    check_experiments(only)
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    steps = {"gaussian-sm-mle": lambda: _gaussian(out / "gaussian-sm-mle.png", 1000 if quick else 10000),
             "ica-error": lambda: _ica(out / "ica-error.png", size, 0.0),
             "ica-misspecified": lambda: _ica(out / "ica-misspecified.png", size, LAPLACE_FRACTION),
             "overcomplete": lambda: _overcomplete(out / "overcomplete-filters.png", out / "overcomplete-dot-products.png", size),
             "manifold-ssm": lambda: _manifold(out / "manifold-ssm.png", size),
             "low-density-scores": lambda: _low_density(out / "low-density-scores.png", size),
             "mixture-langevin": lambda: _mixture(out / "mixture-langevin.png", size),
             "digits": lambda: _digits(out, size, checkpoint)}
    for name in (n for n in EXPERIMENTS if n in only):
        t = time.perf_counter()
        found = steps[name]()
        if name == "overcomplete":
            results["overcomplete-filters"], results["overcomplete-dot-products"] = found
        elif name == "digits":
            results.update(found)
        else:
            results[name] = found
        log.info("%s: %.0f s", name, time.perf_counter() - t)
    results = {key: {"png": f"{key}.png", **results[key]} for key in FIGURES if key in results}
    record_file = out / "results.json"
    before = json.loads(record_file.read_text()) if record_file.exists() else {}
    if before.get("quick", quick) != quick:
        before = {}  # figures of the other size are not mixed in
    figures = {**before.get("figures", {}), **results}
    record = {"quick": quick, "seconds": round(time.perf_counter() - started, 1), "figures": {k: figures[k] for k in FIGURES if k in figures}}
    atomic_write(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=float)))
    return results


def log_to_mlflow(uri: str, out: Path, results: dict[str, dict], experiment: str = "lecture") -> str:
    """One MLflow run "lecture-figures" holding every PNG and results.json, and each figure's scalar numbers as metrics."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import bound_http_requests, experiment_for_training

    bound_http_requests()
    client = MlflowClient(uri)
    experiment_id = experiment_for_training(client, experiment, uri)
    run_id = client.create_run(experiment_id, run_name="lecture-figures").info.run_id
    for figure, numbers in results.items():
        for key, value in numbers.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                client.log_metric(run_id, f"{figure}/{key}".replace(".", "_"), float(value))
    client.log_artifacts(run_id, str(out), "figures")
    client.set_terminated(run_id)
    return run_id
