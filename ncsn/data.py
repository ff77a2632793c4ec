"""Pixel transforms of the NCSN paper: uint8 → [0, 1] with uniform dequantisation and flips, and back; the one
conversion between stored images (uint8 NHWC) and model batches (float NCHW)."""
from __future__ import annotations

import numpy as np
import torch


def to_unit_interval(images: torch.Tensor, dequantize: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images (any layout, any device) → float32 in [0, 1]; ``dequantize`` adds U(0, 1) before dividing by 256.

    A ``generator`` must be on the images' device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    x = images.float()
    if dequantize:
        return (x + torch.rand(x.shape, generator=generator, device=x.device)) / 256.0  # noise where the images are
    return x / 255.0


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of an NCHW batch left–right with probability ½."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → uint8, clamping samples that left the interval."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_stored(x: torch.Tensor) -> np.ndarray:
    """A [0, 1] NCHW batch as images are stored and scored: uint8 (N, H, W, C) on the CPU."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_stored(images: np.ndarray) -> torch.Tensor:
    """Stored images, uint8 (N, H, W, C), as a [0, 1] float32 NCHW batch."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
