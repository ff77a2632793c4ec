"""The toy mixture experiment's figure (NCSN Figure 3; matplotlib, headless). Image grids are ncsn.images."""
from __future__ import annotations

import logging
from pathlib import Path

from ncsn.experiments import lower_left_fraction, mixture_experiment, paper_mixture
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import train_toy_score_model

log = logging.getLogger(__name__)


def mixture_figure(out: Path, n: int = 1280, learned: bool = False, seed: int = 0) -> dict[str, float]:
    """Draw NCSN Figure 3 to ``out``; return the share of samples in the weight-0.2 mode per panel."""
    import matplotlib  # heavy: imported only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

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
