"""Figures: the toy mixture experiment (matplotlib, headless), image grids and Langevin trajectory strips."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ncsn.data import to_uint8

from ncsn.experiments import lower_left_fraction, mixture_experiment, paper_mixture
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import train_toy_score_model

log = logging.getLogger(__name__)


def mixture_figure(out: Path, n: int = 1280, learned: bool = False, seed: int = 0) -> dict[str, float]:
    """Draw NCSN Figure 3 to ``out``; return the share of samples in the weight-0.2 mode per panel."""
    import matplotlib  # here, not at import: the grid and strip writers (used by every Ray worker) need only PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score_fn = None
    if learned:
        log.info("training a noise-conditional MLP with DSM (about 10 s)")
        score_fn = train_toy_score_model(paper_mixture(), geometric_sigmas(20.0, 1.0, 10), seed=seed)
    samples = mixture_experiment(score_fn, n=n, seed=seed)
    panels = {"exact sampling": samples.exact, "Langevin dynamics": samples.langevin, "annealed Langevin": samples.annealed}
    shares = {name: lower_left_fraction(x) for name, x in panels.items()}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, panels.items()):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_title(f"{name}\nweight of (−5,−5) mode: {shares[name]:.2f}")
        ax.set_xlim(-9, 9)
        ax.set_ylim(-9, 9)
        ax.set_aspect("equal")
    fig.suptitle(("learned" if learned else "exact") + " scores; true weights 0.2 / 0.8")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote %s (%s)", out, ", ".join(f"{k}: {v:.2f}" for k, v in shares.items()))
    return shares


def save_image_grid(images: torch.Tensor, out: Path, nrow: int = 10, scale: int = 1) -> Path:
    """Save a (N, C, H, W) batch in [0, 1] as a PNG grid, each image enlarged ``scale`` times (nearest)."""
    from torchvision.utils import make_grid

    x = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=max(1, scale), pad_value=0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid).permute(1, 2, 0).squeeze(-1).numpy()).save(out)
    return out


def save_trajectory_strip(trajectory: list[torch.Tensor], out: Path, num_samples: int = 8, scale: int = 4) -> Path:
    """Rows = samples, columns = snapshots of annealed Langevin (NCSN Figure 4), as one PNG."""
    frames = torch.stack([t[:num_samples] for t in trajectory], dim=1)  # (n, T, C, H, W)
    return save_image_grid(frames.flatten(0, 1), out, nrow=len(trajectory), scale=scale)
