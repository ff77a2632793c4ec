"""Image grids and Langevin trajectory strips as PNG files (PIL; what every sampling and training worker writes)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ncsn.atomic import atomic_write
from ncsn.data import to_uint8


def display_scale(image_size: int) -> int:
    """How many times a grid enlarges its images: small ones to about 32 pixels, none below 1."""
    return max(1, 32 // image_size)


def tile(images: torch.Tensor, nrow: int, padding: int, pad_value: float) -> torch.Tensor:
    """(N, C, H, W) → one (3, rows·(H+p)+p, nrow·(W+p)+p) image, ``padding`` pixels of ``pad_value`` around each
    (grey images become RGB); the layout of torchvision's make_grid, without importing torchvision."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = images.new_full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k, image in enumerate(images):
        y, x = divmod(k, cols)
        grid[:, padding + y * (h + padding):(y + 1) * (h + padding), padding + x * (w + padding):(x + 1) * (w + padding)] = image
    return grid


def save_image_grid(images: torch.Tensor, out: Path, nrow: int = 10, scale: int | None = None) -> Path:
    """Save a (N, C, H, W) batch in [0, 1] as a PNG grid, each image enlarged ``scale`` times (nearest; default
    display_scale of its size)."""
    scale = display_scale(images.shape[-1]) if scale is None else scale
    x = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = tile(x, nrow=nrow, padding=max(1, scale), pad_value=0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(to_uint8(grid).permute(1, 2, 0).squeeze(-1).numpy())
    atomic_write(out, lambda tmp: picture.save(tmp, format="PNG"))
    return out


def save_trajectory_strip(trajectory: list[torch.Tensor], out: Path, num_samples: int = 8, scale: int | None = None) -> Path:
    """Rows = samples, columns = snapshots of annealed Langevin (NCSN Figure 4), as one PNG."""
    frames = torch.stack([t[:num_samples] for t in trajectory], dim=1)  # (n, T, C, H, W)
    return save_image_grid(frames.flatten(0, 1), out, nrow=len(trajectory), scale=scale)
