from pathlib import Path
from unittest import mock

import pytest
from pydantic import ValidationError

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
        (["train.lrr=1"], r"unknown key train.lrr; did you mean optim.lr\? known keys here: .*batch_size.* \(from --set train.lrr=1\)"),
        (["trian.steps=1"], r"unknown key trian; did you mean train\?"),
        (["optim.lr=-1"], r"optim.lr must be a finite number > 0, got -1.0 \(from --set optim.lr=-1\)$"),
        (["optim.lr=.inf"], r"optim.lr must be a finite number > 0, got inf"),
        (["optim.lr=fast"], r"optim.lr must be float, got 'fast' \(from --set optim.lr=fast\)"),
        (["train.steps=ten"], r"train.steps must be int, got 'ten'"),
        (["train.steps=1.5"], r"train.steps must be int, got 1.5"),
        (["model.arch=unet"], r"model.arch must be one of"),
        (["sampling.sampler=ddim"], r"sampling.sampler must be one of als, pc, euler, heun, got 'ddim'"),
        (["sampling.sampler_steps=10"], r"sampling.sampler_steps must be null with sampling.sampler als \(Algorithm 1 walks"),
        (["sampling.sampler=euler", "sampling.churn=5"], r"sampling.churn must be 0 unless sampling.sampler is heun"),
        (["sampling.sampler=heun", "sampling.churn=5", "model.arch=ncsn"], r"sampling.churn must be 0 with model.arch ncsn"),
        (["sampling.sampler=heun", "sampling.s_noise=1.007"], r"sampling.s_noise must be 1.0 unless sampling.churn > 0 .*got 1.007"),
        (["sampling.sampler=heun", "sampling.churn=5", "sampling.s_tmin=1", "sampling.s_tmax=0.5"],
         r"sampling.s_tmax must be above sampling.s_tmin = 1, or null, got 0.5"),
        (["train.sigma_sampling=continuous", "model.arch=ncsn"], r"train.sigma_sampling must be levels with model.arch ncsn"),
        (["tune.samplers=[als,ode]"], r"tune.samplers must be a non-empty list of als, pc, euler, heun, got \['als', 'ode'\]"),
        (["tune.max_nfe=0"], r"tune.max_nfe must be >= 1, got 0"),
        (["tune.churn=[40,-1]"], r"tune.churn must be a non-empty list of finite numbers >= 0, got \[40.0, -1.0\]"),
        (["tune.s_noise=[0]"], r"tune.s_noise must be a non-empty list of finite numbers > 0, got \[0.0\]"),
        (["schedule.recommend=false", "schedule.sigma_min=2"], r"schedule.sigma_min must be > 0 and < schedule.sigma_max, got 2.0"),
        (["schedule.recommend=false", "schedule.num_levels=1"],
         r"schedule.sigma_min must be schedule.sigma_max when schedule.num_levels is 1, got 0.01"),
        (["schedule.sigma_min=0"], r"schedule.sigma_min must be a finite number > 0, got 0.0"),
        (["schedule.recommend=false", "schedule.sigma_max=.inf"], r"schedule.sigma_max must be a finite number > 0, got inf"),
        (["data.source=cifar10"], r"data.input must be a path for source 'cifar10', got None"),
        (["train=3"], r"train must be a mapping"),
        (["nonsense"], r"--set expects key=value"),
        (["tune.steps_per_level=[5,"], r"--set tune.steps_per_level=\[5,: the value is not valid YAML"),
        (["optim.lr={{"], r"--set optim.lr=\{\{: the value is not valid YAML"),
        (["train.ema_decay=1"], r"train.ema_decay must be in \[0, 1\)"),
        (["optim.beta1=2"], r"optim.beta1 must be in \[0, 1\), got 2.0"),
        (["optim.weight_decay=-0.1"], r"optim.weight_decay must be a finite number >= 0, got -0.1"),
        (["name=../../x"], r"name must be a plain name .*no path.*, got '../../x'"),
        (["sampling.chunk_size=0"], r"sampling.chunk_size must be >= 1, got 0"),
        (["cluster.cpus_per_worker=0"], r"cluster.cpus_per_worker must be a finite number > 0, got 0.0"),
        (["data.loader_workers=-1"], r"data.loader_workers must be >= 0, got -1"),
        (["tune.reduction_factor=0"], r"tune.reduction_factor must be >= 2, got 0"),
        (["evaluation.resamples=5"], r"evaluation.resamples must be >= 10, got 5"),
        (["tune.confirm_seeds=1"], r"tune.confirm_seeds must be >= 2 \(the interval needs two\), got 1"),
        (["tune.confirm_train_seeds=1"], r"tune.confirm_train_seeds must be 0 or >= 2 \(the interval needs two\), got 1"),
        (["run_dir=s3://bucket/runs"], r"run_dir must be a local directory, not a URL"),
        (["model.ngf=1"], r"model.ngf must be an integer >= 2 \(InstanceNorm\+\+ compares a layer's channels\), got 1"),  # NaN at step 1
    ],
)
def test_bad_values_name_the_key_and_where_it_came_from(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(CONFIGS / "digits.yaml", overrides)
    assert "\n" not in str(err.value)
    if "--set" not in str(err.value):
        assert "digits.yaml" in str(err.value)


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number > 0, got -1.0 \(in .*c.yaml\)"):
        load_config(tmp_path / "c.yaml", ["train.steps=3"])


def test_unreadable_config_files_are_one_line(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    cases = {tmp_path: "is a directory", tmp_path / "list.yaml": "the top level must be a mapping of sections",
             tmp_path / "binary.yaml": "is not a text"}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_evolve_returns_a_changed_copy_and_leaves_the_config_as_it_was():
    cfg = load_config(CONFIGS / "digits.yaml")
    given = cfg.to_dict()
    out = cfg.evolve({"run_dir": "/elsewhere", "tracking.tracking_uri": "sqlite:///x.db", "schedule.num_levels": 3})
    assert (out.run_dir, out.tracking.tracking_uri, out.schedule.num_levels) == ("/elsewhere", "sqlite:///x.db", 3)
    assert cfg.to_dict() == given
    with pytest.raises(ValidationError, match="frozen"):  # no section of a config can be changed in place
        out.train.steps += 1
    with pytest.raises(KeyError):
        cfg.evolve({"tracking.no_such_key": 1})
    with pytest.raises(ConfigError, match="schedule.num_levels must be >= 1, got 0"):  # a copy is validated like a file
        cfg.evolve({"schedule.num_levels": 0})


@pytest.mark.parametrize("metric, extractor", [("kid_std_classifier", "classifier"), ("fid_inception", "inception")])
def test_the_objective_spec_takes_its_extractor_from_the_metric_and_its_settings_from_the_config(metric, extractor):
    from pipelines.tune.objective import ObjectiveSpec

    cfg = load_config(CONFIGS / "digits.yaml", [f"tune.metric={metric}", "tune.eval_samples=123", "evaluation.resamples=17",
                                                 "sampling.denoise=false", "tune.eval_every=40", "run_dir=/r"])
    spec = ObjectiveSpec.from_config(cfg, "/shards", "validation")
    assert spec == ObjectiveSpec("/shards", "validation", extractor, str(cfg.eval_cache_dir()), 123, 17, False, 40, cfg.evaluation.inception_weights)


def test_the_evaluation_cache_is_the_one_every_command_shares_unless_one_is_given(tmp_path, monkeypatch):
    # run, train, tune and `evaluate` find one classifier per shard set: $NCSN_CACHE, else ~/.cache/ncsn-pipeline, not the
    # run directory's own; absolute either way: evaluation runs on a Ray worker (tuning trials, the pipeline's stage 4)
    from pipelines.evaluate import Evaluator
    from pipelines.tune.objective import ObjectiveSpec

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NCSN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(CONFIGS / "digits.yaml", ["run_dir=runs"]).eval_cache_dir() == tmp_path / "home" / ".cache" / "ncsn-pipeline"
    monkeypatch.setenv("NCSN_CACHE", "shared")
    assert load_config(CONFIGS / "digits.yaml", ["run_dir=runs"]).eval_cache_dir() == tmp_path / "shared"
    with mock.patch("pipelines.evaluate.load_manifest") as manifest, mock.patch("pipelines.evaluate.split_count", return_value=10), \
            mock.patch("pipelines.evaluate._cached_classifier", side_effect=RuntimeError("stop")) as cached:
        manifest.return_value.digest = "d1"
        with pytest.raises(RuntimeError, match="stop"):
            Evaluator("/shards", "classifier")  # `evaluate`'s own default: the same directory, keyed by the shard set
    assert cached.call_args.args == (str(tmp_path / "shared" / "d1" / "classifier.pt"),)
    shared = load_config(CONFIGS / "digits.yaml", ["run_dir=/r", "evaluation.cache_dir=cache"])
    assert shared.eval_cache_dir() == tmp_path / "cache"
    assert ObjectiveSpec.from_config(shared, "/shards", "validation").cache_dir == str(tmp_path / "cache")


@pytest.mark.parametrize("overrides, message", [
    (["cluster.use_gpu=1"], r"cluster.use_gpu must be bool, got 1"),  # no silent conversions
    (["train.steps=true"], r"train.steps must be int, got True"),
    (["train.steps='10'"], r"train.steps must be int, got '10'"),
    (["name=7"], r"name must be str, got 7"),
    (["train.steps=null"], r"train.steps must not be null"),
    (["tune.sigma_min=[0.1]"], r"tune.sigma_min must be \[low, high\] with 0 < low <= high, got \[0.1\]"),
    (["tune.steps_per_level=[5, x]"], r"tune.steps_per_level.1 must be int, got 'x'"),
    (["model.image_size=9"], r"model.image_size must be one of"),
    (["data.source=svhn"], r"data.source must be one of digits, cifar10, mnist, image-folder, got 'svhn'"),
    (["evaluation.cache_dir=s3://bucket/cache"], r"evaluation.cache_dir must be a local directory, not a URL, got 's3://bucket/cache'"),
])
def test_types_are_not_converted_silently(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "digits.yaml", overrides)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 2e-4\nsampling:\n  eps: 1e-5\n")  # YAML 1.1: strings
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.sampling.eps) == (2e-4, 1e-5)


def test_a_single_noise_level_is_configurable_and_trains_and_samples():
    # num_levels: 1 could not be configured (sigma_min had to be below sigma_max, and geometric_sigmas needs them equal).
    import torch

    from ncsn.models import ScoreNetwork
    from ncsn.sampling import sample_images
    from ncsn.sigmas import Schedule
    from ncsn.train import train_steps

    cfg = load_config(CONFIGS / "digits.yaml", ["schedule.recommend=false", "schedule.num_levels=1", "schedule.sigma_max=0.5",
                                                "schedule.sigma_min=0.5", "model.ngf=8"])
    assert cfg.sigmas().tolist() == [0.5]
    net = ScoreNetwork(cfg.model, cfg.sigmas())
    steps = list(train_steps(net, [torch.rand(4, 1, 8, 8)], cfg.sigmas(), torch.optim.Adam(net.parameters()), num_steps=1))
    assert len(steps) == 1 and torch.isfinite(torch.tensor(steps[0].loss))
    out = sample_images(net, (2, 1, 8, 8), Schedule((0.5,), 1e-5, 2), generator=torch.Generator().manual_seed(0)).samples
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
