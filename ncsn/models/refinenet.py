"""The NCSN score network: a RefineNet-style U-net with dilated convolutions (NCSN appendix A).

Blocks take (x, y) with y the noise-level index, used by conditional instance norm++ (or None when
the norms are unconditional, as in NCSNv2). Layout follows the paper's CIFAR-10 model: four stages of
two residual blocks (the second downsamples, the third and fourth dilate by 2 and 4 instead of
downsampling), then four RefineNet blocks fusing coarse to fine. NCSN (CondRefineNetDilated) puts
norms in the RefineNet blocks and average-pools in their chained residual pooling; NCSNv2 has no norms
there and max-pools (``refine_norms=False, pool="max"``, as in ermongroup/ncsnv2's RefineBlock).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ncsn.models.normalization import InstanceNorm2dPlus


class _ELUOnCPU(torch.autograd.Function):
    """ELU (α = 1) as relu(x) + (exp(min(x, 0)) − 1); its derivative min(out, 0) + 1 read from the output, itself
    differentiable (the sliced objective takes the network's gradient with create_graph)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) + (torch.exp(torch.clamp(x, max=0)) - 1)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * (torch.clamp(out, max=0) + 1)


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU (α = 1). PyTorch's CPU kernel evaluates expm1 one element at a time, many times slower than its vectorised
    exp (bench/cpu_network.py), so on CPU it goes through exp: equal to F.elu within 1 ulp of 1."""
    return _ELUOnCPU.apply(x) if x.device.type == "cpu" else F.elu(x)


def _pool_layout(x: torch.Tensor) -> torch.Tensor:
    """On CPU, channels-last memory for the 5×5 pooling: PyTorch's CPU pooling kernels are vectorised over channels only
    in that layout (the default layout's max pool is ~10× slower, bench/cpu_network.py). The values are the same."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _conv3x3(cin: int, cout: int, bias: bool = True, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class NoNorm(nn.Module):
    """The identity in a norm's place (NCSNv2's RefineNet blocks have no normalisation)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x


def _norm(features: int, num_classes: int | None, enabled: bool) -> nn.Module:
    return InstanceNorm2dPlus(features, num_classes) if enabled else NoNorm()


class ConvMeanPool(nn.Module):
    """Convolution followed by 2×2 mean pooling."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """norm → ELU → conv → norm → ELU → conv, plus a shortcut; ``down`` halves the resolution
    (or, with ``dilation``, keeps it and dilates the convolutions, as the paper does past stage 2)."""

    def __init__(self, cin: int, cout: int, num_classes: int | None, down: bool = False, dilation: int | None = None):
        super().__init__()
        self.norm1 = InstanceNorm2dPlus(cin, num_classes)
        d = dilation or 1
        mid = cin if down else cout
        self.conv1 = _conv3x3(cin, mid, dilation=d)
        self.norm2 = InstanceNorm2dPlus(mid, num_classes)
        if down and dilation is None:
            self.conv2: nn.Module = ConvMeanPool(cin, cout)
            self.shortcut: nn.Module | None = ConvMeanPool(cin, cout, kernel_size=1)
        else:
            self.conv2 = _conv3x3(mid, cout, dilation=d)
            self.shortcut = _conv3x3(cin, cout, dilation=d) if (down or cin != cout) else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(elu(self.norm1(x, y)))
        h = self.conv2(elu(self.norm2(h, y)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class RCU(nn.Module):
    """Residual conv units: ``n_blocks`` × (``n_stages`` × norm → ELU → conv) with identity skips."""

    def __init__(self, features: int, n_blocks: int, num_classes: int | None, norms: bool = True, n_stages: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                nn.ModuleDict({"norm": _norm(features, num_classes, norms), "conv": _conv3x3(features, features, bias=False)})
                for _ in range(n_stages)
            )
            for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            h = x
            for stage in block:
                h = stage["conv"](elu(stage["norm"](h, y)))
            x = x + h
        return x


class MultiResolutionFusion(nn.Module):
    """norm → conv each input to ``features`` channels, upsample to the finest shape, and sum."""

    def __init__(self, in_planes: list[int], features: int, num_classes: int | None, norms: bool = True):
        super().__init__()
        self.norms = nn.ModuleList(_norm(c, num_classes, norms) for c in in_planes)
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)

    def forward(self, xs: list[torch.Tensor], y: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            out = out + F.interpolate(conv(norm(x, y)), size=shape, mode="bilinear", align_corners=True)
        return out


class ChainedResidualPooling(nn.Module):
    """ELU, then ``n_stages`` of norm → 5×5 pool (average or max) → conv, each added to the running sum."""

    def __init__(self, features: int, num_classes: int | None, norms: bool = True, pool: str = "avg", n_stages: int = 2):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.norms = nn.ModuleList(_norm(features, num_classes, norms) for _ in range(n_stages))
        self.convs = nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages))
        self.pool = F.avg_pool2d if pool == "avg" else F.max_pool2d

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x = elu(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(_pool_layout(norm(path, y)), 5, stride=1, padding=2))
            x = x + path
        return x


class RefineBlock(nn.Module):
    """RefineNet block: RCU per input → multi-resolution fusion → chained residual pooling → RCU."""

    def __init__(self, in_planes: list[int], features: int, num_classes: int | None, end: bool = False, norms: bool = True,
                 pool: str = "avg"):
        super().__init__()
        self.adapt = nn.ModuleList(RCU(c, 2, num_classes, norms) for c in in_planes)
        self.fuse = MultiResolutionFusion(in_planes, features, num_classes, norms) if len(in_planes) > 1 else None
        self.crp = ChainedResidualPooling(features, num_classes, norms, pool)
        self.out = RCU(features, 3 if end else 1, num_classes, norms)

    def forward(self, xs: list[torch.Tensor], y: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
        hs = [adapt(x, y) for adapt, x in zip(self.adapt, xs)]
        h = self.fuse(hs, y, shape) if self.fuse is not None else hs[0]
        return self.out(self.crp(h, y), y)


class RefineNet(nn.Module):
    """The NCSN body: maps x ∈ [0, 1]^{C×H×W} and a level index y to a tensor of x's shape.

    ``refine_norms`` and ``pool`` choose the RefineNet blocks' form: NCSN's (True, "avg") or NCSNv2's (False, "max")."""

    def __init__(self, channels: int, ngf: int, num_classes: int | None, refine_norms: bool = True, pool: str = "avg"):
        super().__init__()
        n2 = 2 * ngf
        self.begin = nn.Conv2d(channels, ngf, 3, padding=1)
        self.stages = nn.ModuleList([
            nn.ModuleList([ResidualBlock(ngf, ngf, num_classes), ResidualBlock(ngf, ngf, num_classes)]),
            nn.ModuleList([ResidualBlock(ngf, n2, num_classes, down=True), ResidualBlock(n2, n2, num_classes)]),
            nn.ModuleList([ResidualBlock(n2, n2, num_classes, down=True, dilation=2), ResidualBlock(n2, n2, num_classes, dilation=2)]),
            nn.ModuleList([ResidualBlock(n2, n2, num_classes, down=True, dilation=4), ResidualBlock(n2, n2, num_classes, dilation=4)]),
        ])
        block = dict(norms=refine_norms, pool=pool)
        self.refine = nn.ModuleList([
            RefineBlock([n2], n2, num_classes, **block),
            RefineBlock([n2, n2], n2, num_classes, **block),
            RefineBlock([n2, n2], ngf, num_classes, **block),
            RefineBlock([ngf, ngf], ngf, num_classes, end=True, **block),
        ])
        self.end_norm = InstanceNorm2dPlus(ngf, num_classes)
        self.end = nn.Conv2d(ngf, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.begin(2 * x - 1)  # centre [0, 1] inputs as the paper's code does
        features = []
        for stage in self.stages:
            for block in stage:
                h = block(h, y)
            features.append(h)
        h = self.refine[0]([features[3]], y, features[3].shape[2:])
        for refine, skip in zip(self.refine[1:], reversed(features[:3])):
            h = refine([skip, h], y, skip.shape[2:])
        return self.end(elu(self.end_norm(h, y)))
