"""The lecture's figures (matplotlib, headless, imported only inside the drawing functions): the toy mixture (NCSN
Figure 3), ICA error curves, overcomplete filters, SSM losses, score fields. Image grids are ncsn.images."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ncsn.experiments import lower_left_fraction, mixture_experiment, paper_mixture
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import train_toy_score_model

log = logging.getLogger(__name__)


def mixture_figure(out: Path, n: int = 1280, learned: bool = False, seed: int = 0) -> dict[str, float]:
    """Draw NCSN Figure 3 to ``out``; return the share of samples in the weight-0.2 mode per panel."""
    plt = _pyplot()
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
    _save(fig, out)
    log.info("wrote %s (%s)", out, ", ".join(f"{k}: {v:.2f}" for k, v in shares.items()))
    return shares


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported only to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Write the figure to ``out`` (its directory made) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def ica_error_figure(curves, out: Path, title: str) -> Path:
    """Hyvärinen (2005) Figs. 1–2: log10 error of score matching (solid) and maximum likelihood (dashed) vs log10 n."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    x = [math.log10(n) for n in curves.sizes]
    ax.plot(x, [math.log10(e) for e in curves.score_matching], "-o", label="score matching")
    ax.plot(x, [math.log10(e) for e in curves.maximum_likelihood], "--s", label="maximum likelihood")
    ax.set_xlabel("log10 sample size")
    ax.set_ylabel("log10 estimation error")
    ax.set_title(title)
    ax.legend()
    return _save(fig, out)


def filters_figure(filters, out: Path, size: int) -> Path:
    """Hyvärinen (2005) Fig. 3: the estimated filters in pixel space, each scaled to its own range."""
    plt = _pyplot()
    cols = int(math.ceil(math.sqrt(len(filters))))
    rows = int(math.ceil(len(filters) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.5, rows * 0.5))
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, filters):
        ax.imshow(f.reshape(size, size).numpy(), cmap="gray", interpolation="nearest")
    return _save(fig, out)


def dot_products_figure(max_dots, out: Path) -> Path:
    """Hyvärinen (2005) Fig. 4: histogram of each filter's largest |dot product| with another, in the whitened space."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(max_dots.numpy(), bins=20, range=(0, 1))
    ax.set_xlabel("max |w_iᵀw_j| over j ≠ i")
    ax.set_ylabel("filters")
    return _save(fig, out)


def ssm_loss_figure(curves: dict[str, list[float]], out: Path) -> Path:
    """NCSN Fig. 1: sliced score matching loss against iteration, without and with noise (symlog: the noiseless one
    falls without bound)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, losses) in zip(axes, curves.items()):
        ax.plot(losses, lw=0.7)
        ax.set_yscale("symlog")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("SSM loss")
    return _save(fig, out)


def score_field_figure(field, out: Path) -> Path:
    """NCSN Fig. 2: the true score (left) and the learned one (right) as arrows over the data density (shaded)."""
    plt = _pyplot()
    side = int(round(math.sqrt(len(field.grid))))
    xs, ys = field.grid[:, 0].reshape(side, side).numpy(), field.grid[:, 1].reshape(side, side).numpy()
    density = field.log_density.exp().reshape(side, side).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    step = max(1, side // 20)
    for ax, (name, score) in zip(axes, (("true score ∇ log p(x)", field.true), ("learned s_θ(x)", field.learned))):
        ax.contourf(xs, ys, density, levels=20, cmap="Oranges")
        u, v = score[:, 0].reshape(side, side).numpy(), score[:, 1].reshape(side, side).numpy()
        norm = (u**2 + v**2) ** 0.5 + 1e-9
        ax.quiver(xs[::step, ::step], ys[::step, ::step], (u / norm)[::step, ::step], (v / norm)[::step, ::step], scale=30)
        ax.set_title(name)
        ax.set_aspect("equal")
    return _save(fig, out)


def scatter_figure(pairs: dict[str, tuple[list[float], list[float]]], out: Path, xlabel: str, ylabel: str) -> Path:
    """Estimates of one method against another's, one series per name, with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    low, high = float("inf"), float("-inf")
    for name, (a, b) in pairs.items():
        ax.scatter(a, b, s=12, label=name)
        low, high = min(low, *a, *b), max(high, *a, *b)
    ax.plot([low, high], [low, high], "k:", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return _save(fig, out)
