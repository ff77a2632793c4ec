"""Image score networks: the NCSN RefineNet (conditional instance norm++) and its NCSNv2 variant."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ncsn._checks import positive_int
from ncsn.models.refinenet import RefineNet

ARCHITECTURES = ("ncsn", "ncsnv2")
IMAGE_SIZES = (8, 28, 32, 64)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an image score network.

    arch: "ncsn" (noise level by conditional instance norm++, NCSN 2019) or "ncsnv2" (unconditional
      body whose output is divided by σ, NCSNv2 technique 3; its RefineNet blocks have no norms and max-pool).
    image_size: height = width in pixels (8, 28, 32 or 64). channels: 1 or 3. ngf: base width.
    """

    arch: str = "ncsn"
    image_size: int = 32
    channels: int = 3
    ngf: int = 128

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"model.image_size must be one of {IMAGE_SIZES}, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"model.channels must be 1 or 3, got {self.channels!r}")
        positive_int("model.ngf", self.ngf)
        if self.ngf < 2:  # InstanceNorm++ normalises the channel means across channels: one channel has no spread (NaN)
            raise ValueError(f"model.ngf must be an integer >= 2 (InstanceNorm++ compares a layer's channels), got {self.ngf!r}")

    @property
    def levels_only(self) -> bool:
        """True when the network takes only the σ levels it was trained on (arch ncsn's per-level normalisation)."""
        return self.arch == "ncsn"

    def to_dict(self) -> dict:
        return asdict(self)


class ScoreNetwork(nn.Module):
    """s_θ(x, σ) for images in [0, 1]; owns the σ schedule it was trained on.

    CIFAR-10 configuration (arch="ncsn", image_size=32, channels=3, ngf=128, L=10): 30,117,635 parameters,
    in the layer layout of the paper's CondRefineNetDilated (ermongroup/ncsn); arch="ncsnv2": 29,694,083,
    the published NCSNv2 (ermongroup/ncsnv2, models/ncsnv2.py), whatever L.
    """

    def __init__(self, config: ModelConfig, sigmas: torch.Tensor):
        super().__init__()
        if sigmas.dim() != 1 or sigmas.numel() < 1:
            raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
        self.config = config
        self.register_buffer("sigmas", sigmas.detach().clone().float())
        if config.arch == "ncsn":
            self.body = RefineNet(config.channels, config.ngf, sigmas.numel())
        else:
            self.body = RefineNet(config.channels, config.ngf, None, refine_norms=False, pool="max")

    @property
    def levels_only(self) -> bool:
        """True when the network takes only the σ levels it was trained on (ModelConfig.levels_only)."""
        return self.config.levels_only

    def level_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of each σ in the schedule; a σ not in the schedule is an error for arch="ncsn"."""
        log_dist = (sigma.float().log()[:, None] - self.sigmas.log()[None]).abs()
        dist, idx = log_dist.min(dim=1)
        if self.config.arch == "ncsn" and (dist > 1e-3).any():
            bad = sigma[dist > 1e-3][0].item()
            raise ValueError(f"σ={bad:.6g} is not one of the {self.sigmas.numel()} levels this conditional model was trained on")
        return idx

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.config.channels, self.config.image_size, self.config.image_size):
            c, s = self.config.channels, self.config.image_size
            raise ValueError(f"expected images of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        if self.config.arch == "ncsn":
            return self.body(x, self.level_index(sigma))
        return self.body(x, None) / sigma.to(x.dtype).view(-1, 1, 1, 1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
