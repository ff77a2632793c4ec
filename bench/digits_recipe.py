"""Is the digits recipe stable, and what does gradient clipping cost or buy? Variants "LR:CLIP" (CLIP 0: none).

Default mode: each variant trained from scratch (examples/digits.py's recipe, 2500 steps, one thread) per seed; prints
the last 100 steps' mean loss, whether the network collapsed (that mean above 20: a zero score gives D/2 = 32 on 8×8),
and KID of 500 samples (sampling seed 0) against the test split of --shards, on the cached classifier features.
--replay CHECKPOINT: continue a pipeline checkpoint (model and Adam state) for --steps steps per seed and variant, and
count collapses: a stress test from a state where the unclipped recipe was seen to collapse.

Usage: python bench/digits_recipe.py --shards runs/digits/shards/digits [--variants 0.002:0 0.002:10 0.001:0 0.001:10] [--seeds 0 1 2]
       python bench/digits_recipe.py --replay CHECKPOINT [--steps 500] [--seeds 0 1 2 3 4 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import DIGITS  # noqa: E402

from data_prep.sources import DigitsSource  # noqa: E402
from ncsn.checkpoint import load_checkpoint  # noqa: E402
from ncsn.data import to_stored, to_unit_interval  # noqa: E402
from ncsn.models import ModelConfig, ScoreNetwork  # noqa: E402
from ncsn.sampling import sample_images  # noqa: E402
from ncsn.sigmas import recommend_schedule  # noqa: E402
from ncsn.train import EMA, infinite_batches, train_steps  # noqa: E402

COLLAPSED = 20.0  # mean loss of the last 100 steps above this: the network outputs ≈ 0 (loss D/2 = 32)


def train(model: ScoreNetwork, optimizer: torch.optim.Optimizer, images: torch.Tensor, sigmas: torch.Tensor, clip: float,
          seed: int, start: int, steps: int, ema: EMA | None = None) -> list[float]:
    """The losses of steps start+1 … start+steps of fit()'s loop (same batches and dequantisation for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [s.loss for s in train_steps(model, infinite_batches(images, DIGITS["batch_size"], gen), sigmas, optimizer,
                                        num_steps=start + steps, start_step=start, ema=ema, grad_clip=clip or None,
                                        transform=lambda b: to_unit_interval(b, dequantize=True, generator=gen))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="the digits shards (make demo writes runs/digits/shards/digits), for KID")
    parser.add_argument("--variants", nargs="+", default=["0.002:0", "0.002:10", "0.001:0", "0.001:10"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replay")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = DigitsSource()
    images = torch.from_numpy(np.stack([r.image for r in source.read("train", 0, source.count("train"))])).permute(0, 3, 1, 2).contiguous()
    evaluator = None
    if args.shards:
        from pipelines.evaluate import Evaluator
        evaluator = Evaluator(args.shards, "classifier", cache_dir=Path(tempfile.mkdtemp()), resamples=10)
    print("| lr | grad clip | seed | mean loss, last 100 steps | collapsed | KID (500 samples) |" if not args.replay else
          f"| lr | grad clip | seed | collapsed within {args.steps} steps (at step) | mean loss, last 100 steps |")
    print("| --- | --- | --- | --- | --- | --- |" if not args.replay else "| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        lr, clip = (float(v) for v in variant.split(":"))
        for seed in args.seeds:
            if args.replay:
                ckpt = load_checkpoint(args.replay)
                model = ScoreNetwork(ckpt.model_config, ckpt.sigmas)
                model.load_state_dict(ckpt.model)
                optimizer = torch.optim.Adam(model.parameters(), lr=lr)
                optimizer.load_state_dict(ckpt.optimizer)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = train(model, optimizer, images, ckpt.sigmas, clip, seed, ckpt.step, args.steps)
                at = next((ckpt.step + 1 + i for i, loss in enumerate(losses) if loss > COLLAPSED), None)
                print(f"| {lr:g} | {clip:g} | {seed} | {'yes (' + str(at) + ')' if at else 'no'} | {np.mean(losses[-100:]):.3f} |", flush=True)
                continue
            schedule = recommend_schedule(images.float() / 255, steps_per_level=DIGITS["steps_per_level"])
            torch.manual_seed(seed)
            model = ScoreNetwork(ModelConfig(DIGITS["arch"], 8, 1, DIGITS["ngf"]), schedule.sigmas())
            ema = EMA(model, DIGITS["ema_decay"])
            losses = train(model, torch.optim.Adam(model.parameters(), lr=lr), images, schedule.sigmas(), clip, seed, 0,
                           DIGITS["steps"], ema)
            kid = "–"
            if evaluator is not None:
                samples = sample_images(ema.model.eval(), (500, 1, 8, 8), schedule.schedule(),
                                        generator=torch.Generator().manual_seed(0)).samples
                kid = f"{evaluator.evaluate(to_stored(samples)).kid.value:.4f}"
            tail = float(np.mean(losses[-100:]))
            print(f"| {lr:g} | {clip:g} | {seed} | {tail:.3f} | {'yes' if tail > COLLAPSED else 'no'} | {kid} |", flush=True)


if __name__ == "__main__":
    main()
