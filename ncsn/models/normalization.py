"""Instance normalisation++ (NCSN appendix A.1), conditional on the noise level or not (NCSNv2)."""
from __future__ import annotations

import torch
from torch import nn


class InstanceNorm2dPlus(nn.Module):
    """z = γ (x − μ_c)/s_c + β + α (μ_c − m)/v: instance norm that keeps the channel means' spread.

    With ``num_classes`` (conditional instance norm++), γ, α, β are looked up per noise level ``y``;
    without, they are plain parameters and ``y`` is ignored.
    """

    def __init__(self, num_features: int, num_classes: int | None = None):
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        rows = num_classes or 1  # γ, α ~ N(1, 0.02) drawn for each level, β = 0 (as the published code initialises them)
        init = torch.cat([torch.empty(rows, 2 * num_features).normal_(1.0, 0.02), torch.zeros(rows, num_features)], dim=1)
        if num_classes:
            self.embed = nn.Embedding(num_classes, 3 * num_features)
            self.embed.weight.data.copy_(init)
        else:
            self.weight = nn.Parameter(init[0])

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        spread = (means - means.mean(1, keepdim=True)) / (means.var(1, keepdim=True) + 1e-5).sqrt()
        h = nn.functional.instance_norm(x)
        params = self.embed(y) if self.num_classes else self.weight.expand(x.shape[0], -1)
        gamma, alpha, beta = params.view(x.shape[0], 3, self.num_features, 1, 1).unbind(1)
        return gamma * (h + spread[..., None, None] * alpha) + beta
