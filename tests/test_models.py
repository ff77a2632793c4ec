import pytest
import torch

from ncsn.models import ModelConfig, ScoreNetwork, count_parameters
from ncsn.sigmas import geometric_sigmas

SIGMAS = geometric_sigmas(1.0, 0.01, 10)


def test_cifar10_configuration_parameter_count():
    # Same layer structure as the paper's CondRefineNetDilated (ermongroup/ncsn) with ngf=128, L=10.
    assert count_parameters(ScoreNetwork(ModelConfig("ncsn", 32, 3, 128), SIGMAS)) == 30_117_635
    # The published NCSNv2 (ermongroup/ncsnv2 models/ncsnv2.py) at CIFAR-10 size: no norms in its RefineNet blocks.
    assert count_parameters(ScoreNetwork(ModelConfig("ncsnv2", 32, 3, 128), geometric_sigmas(50.0, 0.01, 232))) == 29_694_083


@pytest.mark.parametrize("arch", ["ncsn", "ncsnv2"])
@pytest.mark.parametrize("size, channels", [(8, 1), (28, 1), (32, 3), (64, 3)])
def test_output_shape_matches_input(arch, size, channels):
    model = ScoreNetwork(ModelConfig(arch, size, channels, 8), SIGMAS)
    x = torch.rand(2, channels, size, size)
    assert model(x, SIGMAS[[0, 9]]).shape == x.shape


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8)
    cond = ScoreNetwork(ModelConfig("ncsn", 8, 1, 8), SIGMAS)
    with torch.no_grad():
        cond.body.end_norm.embed.weight[3].mul_(2.0)  # make level 3's embedding differ
        assert not torch.allclose(cond(x, SIGMAS[[0]]), cond(x, SIGMAS[[3]]))
        v2 = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS)
        assert torch.allclose(v2(x, SIGMAS[[9]]) * SIGMAS[9], v2(x, SIGMAS[[0]]) * SIGMAS[0], atol=1e-6)


def test_bad_config_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig("unet", 32, 3, 8)
    with pytest.raises(ValueError, match="model.image_size"):
        ModelConfig("ncsn", 30, 3, 8)
    with pytest.raises(ValueError, match="model.channels"):
        ModelConfig("ncsn", 32, 2, 8)
    model = ScoreNetwork(ModelConfig("ncsn", 8, 1, 8), SIGMAS)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8), SIGMAS[:2])
    with pytest.raises(ValueError, match="not one of the 10 levels"):
        model(torch.rand(1, 1, 8, 8), torch.tensor([0.5]))


def test_the_library_imports_without_matplotlib_ray_mlflow_or_webdataset():
    # ncsn/ is pure PyTorch, usable in a notebook; matplotlib loads only when a figure is drawn (every Ray worker imports ncsn).
    import pkgutil
    import subprocess
    import sys
    from pathlib import Path

    import ncsn

    modules = [f"ncsn.{m.name}" for m in pkgutil.walk_packages(ncsn.__path__, "") if not m.name.startswith("_")]
    code = f"import sys; import {', '.join(modules)}; print([m for m in ('matplotlib', 'ray', 'mlflow', 'webdataset') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(ncsn.__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_cpu_elu_is_torchs_elu_with_its_first_and_second_derivatives():
    # ncsn.models.refinenet.elu goes through exp on CPU (torch's CPU ELU is a scalar expm1): same values, and derivatives
    # of both orders (the sliced objective differentiates the network with create_graph).
    from torch.nn import functional as F

    from ncsn.models.refinenet import elu

    x = torch.cat([torch.linspace(-30, 30, 10_001), torch.tensor([-1e-7, 0.0, 1e-7, 1e4])])
    assert torch.allclose(elu(x), F.elu(x), rtol=0, atol=1.2e-7)  # exp(x) − 1 near 0: within 1 ulp of 1
    assert torch.equal(elu(x)[x > 0], x[x > 0])
    x64 = (torch.randn(64, dtype=torch.float64) * 3).requires_grad_()
    assert torch.allclose(elu(x64), F.elu(x64), rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(elu, (x64,)) and torch.autograd.gradgradcheck(elu, (x64,))
    (g,) = torch.autograd.grad(elu(x64).sum(), x64, create_graph=True)
    (g_ref,) = torch.autograd.grad(F.elu(x64).sum(), x64, create_graph=True)
    assert torch.allclose(g, g_ref) and torch.allclose(torch.autograd.grad(g.sum(), x64)[0], torch.autograd.grad(g_ref.sum(), x64)[0])


def test_the_network_gives_the_same_scores_and_gradients_as_with_torchs_own_elu_and_pooling():
    from unittest import mock

    from torch.nn import functional as F

    from ncsn.models import refinenet

    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)

    def score_and_grads():
        model.zero_grad()
        out = model(x, SIGMAS[[0, 3, 6, 9]].double())
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = score_and_grads()
    with mock.patch.object(refinenet, "elu", F.elu), mock.patch.object(refinenet, "_pool_layout", lambda h: h):
        ref_out, ref_grads = score_and_grads()
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(g, r, rtol=1e-10, atol=1e-12) for g, r in zip(grads, ref_grads))
