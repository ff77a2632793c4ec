"""Sample quality against network evaluations (NFE) for each sampler of one trained model: the frontier.

Every setting (sampler, σ grid size N, corrector steps, churn) draws --samples images on each of --seeds sampling
seeds; its KID (standardised classifier features, the tuning objective) against the validation split is paired by seed
with Algorithm 1 at the checkpoint's own setting (the reference, its full NFE). The unit of replication is the sampling
seed of one trained network; the paired difference d = KID(setting) − KID(Algorithm 1) gets a 95% t interval with
seeds − 1 df. Selection (validation split): the smallest NFE whose interval does not lie above 0 (not distinguishably
worse than Algorithm 1). Judgement (test split, fresh seeds): that setting against Algorithm 1 again, paired, so what
selected it does not judge it. Last line: ``nfe_ratio=<selected NFE / Algorithm 1's>`` when the judgement confirms it,
else ``nfe_ratio=1`` (nothing cheaper confirmed).

Also printed: each setting's cost for a 50 000-sample FID on a CIFAR-10 network, extrapolated from the CIFAR-sized
forward time of BENCHMARKS.md (--cifar-forward-s, seconds per image-forward on this CPU) × NFE × 50 000.

Usage: python bench/nfe_frontier.py --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits
[--cache-dir runs/digits/eval_cache] [--samples 500] [--seeds 3] [--figure docs/nfe_frontier.png] [--json F]
[--tracking-uri URI]; --redraw F --figure PNG draws a saved run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ncsn.sampling import nfe
from ncsn.sigmas import Sampler, Schedule
from pipelines.sample import load_model
from pipelines.tune.objective import ObjectiveSpec, sample_and_score
from pipelines.tune.verdict import detectable_difference, t_interval

METRIC = "kid_std_classifier"


def settings(schedule: Schedule, levels_only: bool) -> list[tuple[str, Schedule]]:
    """The frontier's settings: Algorithm 1 with fewer steps per level, predictor–corrector, Euler, Heun (and Heun with
    churn, at S_noise 1 and 0.8, where the model takes any σ), over grid sizes from about 10 to about 40 evaluations."""
    out = [(f"als T={t}", replace(schedule, steps_per_level=t)) for t in (1, 2, 3, 5) if t < schedule.steps_per_level]
    grids = {"pc": [(n, m) for n, m in ((10, 1), (20, 0), (21, 1), (40, 0))], "euler": [(10, 0), (20, 0), (40, 0)],
             "heun": [(6, 0), (11, 0), (18, 0)]}
    for name, points in grids.items():
        for n, m in points:
            out.append((f"{name} N={n}" + (f" M={m}" if name == "pc" else ""),
                        replace(schedule, sampler=Sampler(name, steps=n, corrector_steps=m if name == "pc" else 1))))
    if not levels_only:
        out += [(f"heun N={n} churn=40", replace(schedule, sampler=Sampler("heun", steps=n, churn=40.0))) for n in (6, 11, 18)]
        # S_noise below 1: churn adds less noise than it removes (a lowered temperature); 0.8 from exploratory runs on
        # the validation split with other seeds (100-103), never the test split
        out += [(f"heun N={n} churn=40 s_noise=0.8", replace(schedule, sampler=Sampler("heun", steps=n, churn=40.0, s_noise=0.8)))
                for n in (6, 8, 11, 18)]
    return out


def family(setting: str) -> str:
    """A setting's line on the figure: its sampler, with pc's corrector steps and heun's churn and S_noise ("pc M=1",
    "heun churn s_noise=0.8")."""
    words = setting.split()
    return " ".join([words[0], *(w for w in words[1:] if w.startswith("M=")), *(["churn"] if "churn" in setting else []),
                     *(w for w in words[1:] if w.startswith("s_noise="))])


def figure(rows: list[dict], reference: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(family(r["setting"]), []).append(r)
    for name, points in families.items():
        points = sorted(points, key=lambda r: r["nfe"])
        ax.errorbar([p["nfe"] for p in points], [p["kid"] for p in points],
                    yerr=[[p["kid"] - p["kid_low"] for p in points], [p["kid_high"] - p["kid"] for p in points]],
                    marker="o", capsize=3, label=name)
    ax.errorbar([reference["nfe"]], [reference["kid"]], yerr=[[reference["kid"] - reference["kid_low"]], [reference["kid_high"] - reference["kid"]]],
                marker="*", markersize=12, color="black", capsize=3, label="Algorithm 1 (the checkpoint's)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("KID, standardised classifier features (validation split)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--cache-dir", help="the evaluation cache (classifier, reference features); default: a temporary one")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--figure", type=Path, help="write the frontier as a PNG here")
    parser.add_argument("--json", type=Path, help="write every row as JSON here")
    parser.add_argument("--tracking-uri", help="log the frontier (metrics by NFE, the figure, the rows) as an MLflow run")
    parser.add_argument("--cifar-forward-s", type=float, default=1 / 14.33,
                        help="seconds per image-forward of the CIFAR-10 network on this CPU (BENCHMARKS.md, model step)")
    parser.add_argument("--samplers", nargs="+", default=["als", "pc", "euler", "heun"], help="the samplers whose settings to run")
    parser.add_argument("--redraw", type=Path, metavar="JSON", help="only draw --figure from a --json this script wrote")
    args = parser.parse_args()
    if args.redraw:
        saved = json.loads(args.redraw.read_text())
        figure(saved["rows"], saved["reference"], args.figure, saved["title"])
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    reference = ckpt.schedule
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        spec = {split: ObjectiveSpec(args.shards, split, "classifier", cache, args.samples, 100, reference.denoise, 0)
                for split in ("validation", "test")}

        def kid(schedule: Schedule, split: str, seeds: range) -> tuple[list[float], float]:
            """KID on each seed, and seconds per image-evaluation (sampling only)."""
            values, seconds = [], 0.0
            for seed in seeds:
                t = time.perf_counter()
                values.append(sample_and_score(spec[split].evaluator(), model, schedule, spec[split], seed)[0][METRIC])
                seconds += time.perf_counter() - t
            return values, seconds / (len(seeds) * args.samples * nfe(schedule, model.levels_only))

        selection, judgement = range(args.seeds), range(1000, 1000 + args.seeds)
        base, per_eval = kid(reference, "validation", selection)
        full = nfe(reference, model.levels_only)
        ref_kid = t_interval(np.array(base))
        ref_row = {"nfe": full, "kid": ref_kid.value, "kid_low": ref_kid.low, "kid_high": ref_kid.high}
        print(f"{args.checkpoint}: arch {model.config.arch}, {len(reference.sigmas)} levels; {args.samples} samples per seed, "
              f"{args.seeds} sampling seeds (the unit), paired t with {args.seeds - 1} df; KID × 1e3 on the validation split")
        print("| setting | NFE | KID mean [95% t] | paired d vs Algorithm 1 [95% t] | not worse | 50k CIFAR-10 samples, CPU-hours |")
        print("| --- | --- | --- | --- | --- | --- |")

        def cifar_hours(n: int) -> float:
            return 50_000 * n * args.cifar_forward_s / 3600

        print(f"| Algorithm 1, the checkpoint's (T={reference.steps_per_level}) | {full} | {1e3 * ref_kid.value:.1f} "
              f"[{1e3 * ref_kid.low:.1f}, {1e3 * ref_kid.high:.1f}] | — | — | {cifar_hours(full):.0f} |")
        rows = []
        for label, schedule in settings(reference, model.levels_only):
            if schedule.sampler.name not in args.samplers:
                continue
            values, _ = kid(schedule, "validation", selection)
            own, diff = t_interval(np.array(values)), t_interval(np.array(values) - np.array(base))
            n = nfe(schedule, model.levels_only)
            row = {"setting": label, "nfe": n, "kid": own.value, "kid_low": own.low, "kid_high": own.high, "d": diff.value, "d_low": diff.low,
                   "d_high": diff.high, "not_worse": diff.low <= 0, "sampler": asdict(schedule.sampler),
                   "steps_per_level": schedule.steps_per_level, "kid_seeds": values}
            rows.append(row)
            print(f"| {label} | {n} | {1e3 * own.value:.1f} [{1e3 * own.low:.1f}, {1e3 * own.high:.1f}] | {1e3 * diff.value:+.1f} "
                  f"[{1e3 * diff.low:+.1f}, {1e3 * diff.high:+.1f}] | {'yes' if row['not_worse'] else 'no'} | {cifar_hours(n):.0f} |")
        passing = sorted((r for r in rows if r["not_worse"]), key=lambda r: (r["nfe"], r["kid"]))
        print(f"\nper image-evaluation on this CPU: {1e3 * per_eval:.2f} ms for this network (Algorithm 1's runs); "
              f"CIFAR-10 column: {args.cifar_forward_s:.3f} s per image-forward × NFE × 50 000")
        ratio = 1.0
        if passing:
            chosen = passing[0]
            schedule = dict(settings(reference, model.levels_only))[chosen["setting"]]
            ref_test, _ = kid(reference, "test", judgement)
            chosen_test, _ = kid(schedule, "test", judgement)
            paired = np.array(chosen_test) - np.array(ref_test)
            judged = t_interval(paired)
            confirmed = judged.low <= 0
            detectable = detectable_difference(float(np.std(paired, ddof=1) / np.sqrt(len(paired))), len(paired) - 1)
            print(f"selected (validation, seeds {selection.start}–{selection.stop - 1}): {chosen['setting']} at {chosen['nfe']} NFE; "
                  f"judged (test split, fresh seeds {judgement.start}–{judgement.stop - 1}): paired d × 1e3 = {1e3 * judged.value:+.1f} "
                  f"[{1e3 * judged.low:+.1f}, {1e3 * judged.high:+.1f}] (95% t, {args.seeds - 1} df): "
                  + ("not distinguishably worse than Algorithm 1" if confirmed else "worse than Algorithm 1, not confirmed")
                  + f"; a true difference of {1e3 * detectable:.1f} would be detected with 80% power")
            if confirmed:
                ratio = chosen["nfe"] / full
            chosen["judged"] = {"d": judged.value, "d_low": judged.low, "d_high": judged.high, "confirmed": confirmed, "detectable": detectable,
                                "kid_seeds": chosen_test, "reference_kid_seeds": ref_test}
        else:
            print("no cheaper setting is within the paired interval of Algorithm 1 on the validation split")
        title = (f"{args.checkpoint} ({model.config.arch}), {args.samples} samples × {args.seeds} seeds, 95% t intervals "
                 f"({args.seeds - 1} df)")
        if args.figure:
            figure(rows, ref_row, args.figure, title)
        if args.json:
            args.json.write_text(json.dumps({"reference": {**ref_row, "kid_seeds": base}, "rows": rows, "nfe_ratio": ratio,
                                             "title": title}, indent=1))
        if args.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(args.tracking_uri)
            mlflow.set_experiment("nfe-frontier")
            with mlflow.start_run(run_name=f"nfe-frontier-{model.config.arch}"):
                mlflow.log_params({"checkpoint": args.checkpoint, "samples": args.samples, "seeds": args.seeds, "arch": model.config.arch})
                for r in rows:
                    mlflow.log_metric(f"kid.{family(r['setting']).replace(' ', '_').replace('=', '')}", r["kid"], step=r["nfe"])
                mlflow.log_metric("kid.als_reference", ref_row["kid"], step=full)
                mlflow.log_metric("nfe_ratio", ratio)
                mlflow.log_dict({"reference": ref_row, "rows": rows}, "nfe_frontier.json")
                if args.figure:
                    mlflow.log_artifact(str(args.figure))
    print(f"nfe_ratio={ratio:.3g}")


if __name__ == "__main__":
    main()
