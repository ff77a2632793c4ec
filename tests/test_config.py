from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10", "celeba", "cifar10-ncsnv2", "celeba64-ncsnv2"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.model.image_size in (8, 28, 32, 64)


@pytest.mark.parametrize("name, size, sigma_1, levels, step_lr, steps", [
    ("cifar10-ncsnv2", 32, 50.0, 232, 6.2e-6, 300_001),   # ermongroup/ncsnv2 configs/cifar10.yml
    ("celeba64-ncsnv2", 64, 90.0, 500, 3.3e-6, 210_001),  # ermongroup/ncsnv2 configs/celeba.yml
])
def test_ncsnv2_presets_have_the_published_numbers(name, size, sigma_1, levels, step_lr, steps):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.arch, cfg.model.image_size, cfg.model.channels, cfg.model.ngf) == ("ncsnv2", size, 3, 128)
    assert not cfg.schedule.recommend
    sigmas = cfg.sigmas()
    assert len(sigmas) == levels and sigmas[0].item() == pytest.approx(sigma_1) and sigmas[-1].item() == pytest.approx(0.01)
    assert sigmas[1].item() / sigmas[0].item() == pytest.approx(sigmas[-1].item() / sigmas[-2].item(), rel=1e-4)  # geometric
    assert cfg.sampling.eps == pytest.approx(2 * step_lr)  # official step_lr in Algorithm 1's convention
    assert (cfg.sampling.steps_per_level, cfg.sampling.denoise) == (5, True)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.weight_decay, cfg.optim.amsgrad) == (1e-4, 0.9, 0.0, False)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.ema_decay, cfg.train.objective) == (128, steps, 0.999, "dsm")
    assert cfg.data.random_flip and not cfg.data.dequantize


def test_cifar10_preset_has_the_paper_hyper_parameters():
    cfg = load_config(CONFIGS / "cifar10.yaml")
    assert (cfg.schedule.sigma_max, cfg.schedule.sigma_min, cfg.schedule.num_levels) == (1.0, 0.01, 10)
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.steps, cfg.sampling.steps_per_level) == (1e-3, 128, 200_000, 100)
    assert cfg.sampling.eps == pytest.approx(2 * 2e-5)  # the official step_lr, in Algorithm 1's convention
    assert cfg.sigmas().tolist()[0] == pytest.approx(1.0) and len(cfg.sigmas()) == 10


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "digits.yaml", ["optim.lr=2e-4", "train.steps=10", "optim.grad_clip=1", "cluster.use_gpu=true"])
    assert cfg.optim.lr == 2e-4 and cfg.train.steps == 10 and cfg.optim.grad_clip == 1.0 and cfg.cluster.use_gpu is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], r"unknown key train.lrr; known keys here: .*batch_size"),
        (["optim.lr=-1"], r"optim.lr must be > 0, got -1.0"),
        (["optim.lr=fast"], r"optim.lr must be float, got 'fast'"),
        (["train.steps=ten"], r"train.steps must be int, got 'ten'"),
        (["train.steps=1.5"], r"train.steps must be int, got 1.5"),
        (["model.arch=unet"], r"model.arch must be one of"),
        (["schedule.recommend=false", "schedule.sigma_min=2"], r"schedule.sigma_min must be > 0 and < schedule.sigma_max, got 2.0"),
        (["data.source=cifar10"], r"data.input must be a path for source 'cifar10', got None"),
        (["train=3"], r"train must be a mapping"),
        (["nonsense"], r"--set expects key=value"),
        (["train.ema_decay=1"], r"train.ema_decay must be in \[0, 1\)"),
    ],
)
def test_bad_values_name_the_key_and_the_file(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(CONFIGS / "digits.yaml", overrides)
    if "--set" not in message:
        assert "digits.yaml" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
