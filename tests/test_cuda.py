"""The CUDA-only paths of ncsn/: autocast + GradScaler training steps, EMA and checkpoints across devices, and
sampling / inpainting on a GPU equal to the CPU's for the same seed. Skipped (the one allowed skip) without a GPU;
pure PyTorch, so it runs from the tree on a GPU machine without Ray or MLflow (`PYTHONPATH=. pytest tests/test_cuda.py`)."""
import pytest
import torch

from ncsn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ncsn.data import to_unit_interval
from ncsn.ema import EMA
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sampling import inpaint, sample_images
from ncsn.sigmas import Schedule, geometric_sigmas
from ncsn.train import infinite_batches, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
SIGMAS = geometric_sigmas(1.0, 0.01, 6)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """CPU/GPU comparisons in true fp32: TF32 matmuls and convolutions would round at 1e-3."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _bars() -> torch.Tensor:
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 3:5] = 255
    return images


@pytest.mark.parametrize("arch", ["ncsn", "ncsnv2"])
def test_autocast_and_grad_scaler_train_on_the_gpu(arch):
    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig(arch, 8, 1, 16), SIGMAS).to(CUDA)
    ema = EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator().manual_seed(0)
    stats = list(train_steps(model, infinite_batches(_bars(), 16, gen), SIGMAS, opt, num_steps=80, ema=ema, grad_clip=1.0,
                             transform=to_unit_interval, amp=True, scaler=scaler))
    assert [s.step for s in stats] == list(range(1, 81))
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert sum(s.loss for s in stats[-10:]) < 0.7 * sum(s.loss for s in stats[:10])
    assert scaler.get_scale() > 0 and all(p.device.type == "cuda" for p in ema.model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps the master weights in fp32


def test_checkpoint_saved_on_the_gpu_loads_on_the_cpu_and_back(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig("ncsn", 8, 1, 8)
    model = ScoreNetwork(config, SIGMAS).to(CUDA)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    list(train_steps(model, infinite_batches(_bars(), 16, torch.Generator().manual_seed(0)), SIGMAS, opt, num_steps=3,
                     ema=EMA(model, 0.9), transform=to_unit_interval))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, Checkpoint(config, Schedule(SIGMAS), model.state_dict(), model.state_dict(), opt.state_dict(), 3))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x.to(CUDA), SIGMAS[[0, 1, 2, 3]].to(CUDA)).cpu()
    on_cpu = load_checkpoint(path, map_location="cpu")
    cpu_model = on_cpu.build_model().eval()
    assert all(t.device.type == "cpu" for t in on_cpu.model.values())
    with torch.no_grad():
        assert torch.allclose(cpu_model(x, SIGMAS[[0, 1, 2, 3]]), expected, atol=1e-4, rtol=1e-4)
    back = load_checkpoint(path, map_location="cuda")
    opt2 = torch.optim.Adam(cpu_model.to(CUDA).parameters(), 1e-3)
    opt2.load_state_dict(back.optimizer)  # the optimiser state resumes on the GPU
    assert all(v.device.type == "cuda" for s in opt2.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


def _model() -> ScoreNetwork:
    torch.manual_seed(0)
    return ScoreNetwork(ModelConfig("ncsn", 8, 1, 8), SIGMAS).eval()


def test_sampling_on_the_gpu_equals_the_cpu_for_the_same_seed():
    # A CPU generator draws the same noise wherever the chain runs (ncsn.sampling draws on the generator's device).
    model = _model()
    cpu = sample_images(model, (16, 1, 8, 8), Schedule(SIGMAS, 2e-5, 5), generator=torch.Generator().manual_seed(3)).samples
    gpu = sample_images(model.to(CUDA), (16, 1, 8, 8), Schedule(SIGMAS, 2e-5, 5), generator=torch.Generator().manual_seed(3),
                        device=CUDA).samples
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    cuda_gen = [sample_images(model, (16, 1, 8, 8), Schedule(SIGMAS, 2e-5, 5), generator=torch.Generator(device=CUDA).manual_seed(3),
                              device=CUDA).samples for _ in range(2)]
    assert torch.equal(cuda_gen[0], cuda_gen[1])  # a GPU generator is reproducible on the GPU


def test_inpainting_on_the_gpu_equals_the_cpu_for_the_same_seed():
    model = _model()
    image = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 8, 8)
    mask[:, 2:6, 2:6] = 0
    cpu = inpaint(model, image, mask, SIGMAS, 2e-5, 5, generator=torch.Generator().manual_seed(4))
    gpu = inpaint(model.to(CUDA), image.to(CUDA), mask.to(CUDA), SIGMAS.to(CUDA), 2e-5, 5, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    assert torch.equal(gpu.cpu()[..., 0, 0], image[..., 0, 0])  # known pixels kept
