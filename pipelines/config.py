"""The pipeline's configuration: typed dataclasses loaded from YAML, with dotted overrides
(`--set train.lr=2e-4`), validated once here with errors that name the key."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ncsn.models import ModelConfig
from ncsn.sigmas import geometric_sigmas


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or invalid; the message names the key (also in ``key``)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class DataConfig:
    """Where the images come from and how they are read."""

    source: str = "digits"  # digits | cifar10 | mnist | image-folder
    input: str | None = None  # tarball, idx directory or image folder (not for digits)
    shards: str | None = None  # shard directory/URL; default: <run_dir>/shards/<source>
    shard_size: int = 1000
    crop: int | None = None
    resize: int | None = None
    loader_workers: int = 2
    shuffle_buffer: int = 1000
    dequantize: bool = True  # uniform dequantisation (NCSN §5)
    random_flip: bool = False


@dataclass
class ScheduleConfig:
    """The σ schedule; with recommend: true, NCSNv2's rules from the shard manifest's statistics."""

    recommend: bool = False
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    num_levels: int = 10


@dataclass
class OptimConfig:
    """Adam, as in the paper."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    amsgrad: bool = False
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 200_000
    batch_size: int = 128
    ema_decay: float = 0.999
    checkpoint_every: int = 5000
    log_every: int = 100
    sample_every: int = 5000
    seed: int = 0
    amp: bool = True  # used on GPU only
    objective: str = "dsm"  # dsm (denoising score matching) | ssm (sliced score matching, variance-reduced), per σ level


@dataclass
class SamplingConfig:
    """Annealed Langevin dynamics (Algorithm 1: x + (α/2) s + √α z, α = ε σ_i²/σ_L²)."""

    num_samples: int = 1000
    steps_per_level: int = 100
    eps: float = 4e-5
    denoise: bool = True
    workers: int = 2
    chunk_size: int = 100


@dataclass
class EvaluationConfig:
    """FID / KID / IS on torch-fidelity's feature extractors, each with a 95% bootstrap interval."""

    feature_extractor: str = "classifier"  # classifier | inception
    inception_weights: str | None = None  # a local weights file for air-gapped clusters
    resamples: int = 200  # bootstrap resamples behind each interval


@dataclass
class TrackingConfig:
    """MLflow; tracking_uri null means $MLFLOW_TRACKING_URI, else sqlite under the run directory."""

    tracking_uri: str | None = None
    experiment: str = "ncsn"
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with the `gpu` extra) of every host, every 10 s
    flush_timeout: float = 60.0  # seconds to wait at the end for an unreachable server before leaving it to sync-metrics
    register_model: str | None = None  # also register the final model under this name in MLflow's model registry


@dataclass
class TuneConfig:
    """Ray Tune over the σ schedule and the sampler. Ranges are [low, high]; the *_scale ones multiply the
    NCSNv2 recommendation for the data set, which is always trial 0 ("recommended")."""

    trials: int = 16
    sigma_max_scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # log-uniform × recommended σ_1
    sigma_min: list[float] = field(default_factory=lambda: [0.005, 0.05])  # log-uniform
    num_levels_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])  # × recommended L, rounded
    eps_scale: list[float] = field(default_factory=lambda: [0.3, 3.0])  # log-uniform × recommended ε
    steps_per_level: list[int] = field(default_factory=lambda: [5, 10, 20])  # choices for T
    eval_every: int = 500  # training steps between objective evaluations (ASHA's rungs)
    eval_samples: int = 250  # samples per evaluation of the objective
    metric: str = "kid_classifier"  # unbiased KID on standardised features: its mean does not move with the count
    confirm_top: int = 3  # after the search, re-evaluate the best k trials and `recommended` (0: no confirmation)
    confirm_seeds: int = 3  # … each on this many fresh sampling seeds (paired across trials)
    confirm_samples: int = 1000  # … at this many samples per seed
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: cluster CPUs (or GPUs) / resources per trial
    seed: int = 0

    @property
    def extractor(self) -> str:
        """The feature extractor ``metric`` is measured with (its suffix: kid_classifier → classifier)."""
        return self.metric.rsplit("_", 1)[1]


@dataclass
class ClusterConfig:
    """Ray Train scaling and storage."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # default: <run_dir>/ray; shared or cloud storage on multi-node clusters
    shared_filesystem: bool = False  # true: a local storage_path is mounted on every node (NFS, …)
    max_failures: int = 2


@dataclass
class Config:
    """The whole pipeline configuration."""

    name: str = "ncsn"
    run_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def sigmas(self):
        """The fixed σ schedule (when not recommended from data)."""
        return geometric_sigmas(self.schedule.sigma_max, self.schedule.sigma_min, self.schedule.num_levels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def evolve(self, changes: dict[str, object]) -> Config:
        """A copy with ``changes`` applied ({"run_dir": …, "tracking.tracking_uri": …}); this config is left as it is."""
        out = copy.deepcopy(self)
        for key, value in changes.items():
            *sections, name = key.split(".")
            target = functools.reduce(getattr, sections, out)
            if not hasattr(target, name):
                raise KeyError(key)
            setattr(target, name, value)
        return out


def _coerce(value, tp, key: str):
    """``value`` as type ``tp`` (int → float allowed, None only for optional fields), else ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if value is None:
        raise ConfigError(f"{key} must not be null", key)
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # --set tune.steps_per_level=[5,10]
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}", key)
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}", key)


def _dotted_keys(cls=None, prefix: str = "") -> list[str]:
    """Every section and key of the config, dotted: data, data.source, …"""
    out = []
    for f in dataclasses.fields(cls or Config):
        tp = typing.get_type_hints(cls or Config)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out += _dotted_keys(tp, f"{prefix}{f.name}.")
    return out


def _suggest(key: str) -> str | None:
    """The known key closest to a mistyped one: by the whole dotted key, else by its last part in any section."""
    keys = _dotted_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75)
    return next((k for k in keys if by_leaf and k.rsplit(".", 1)[-1] == by_leaf[0]), None)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}", prefix.rstrip('.') or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        close = _suggest(f"{prefix}{unknown[0]}")
        hint = f"did you mean {close}? " if close else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; {hint}known keys here: {', '.join(sorted(names))}", f"{prefix}{unknown[0]}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err), str(err).split()[0]) from None


def _set_dotted(tree: dict, assignment: str) -> str:
    """Apply one ``key=value`` override to ``tree``; returns the key."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: {key!r} is not a dotted key such as optim.lr")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    return key


def _finite_positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _validate(cfg: Config) -> None:
    d, s, o, t, smp = cfg.data, cfg.schedule, cfg.optim, cfg.train, cfg.sampling
    checks = [  # (key, value, valid, what a valid value is)
        ("name", cfg.name, bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name)),
         "a plain name (letters, digits, '.', '_', '-'; no path): it names directories under run_dir"),
        ("data.source", d.source, d.source in ("digits", "cifar10", "mnist", "image-folder"), "one of digits, cifar10, mnist, image-folder"),
        ("data.input", d.input, d.source == "digits" or d.input is not None, f"a path for source {d.source!r}"),
        ("data.shard_size", d.shard_size, d.shard_size >= 1, ">= 1"),
        ("data.loader_workers", d.loader_workers, d.loader_workers >= 0, ">= 0"),
        ("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer >= 0, ">= 0"),
        ("data.crop", d.crop, d.crop is None or d.crop >= 1, ">= 1 or null"),
        ("data.resize", d.resize, d.resize is None or d.resize >= 1, ">= 1 or null"),
        ("schedule.sigma_max", s.sigma_max, _finite_positive(s.sigma_max), "a finite number > 0"),
        ("schedule.sigma_min", s.sigma_min, _finite_positive(s.sigma_min) and (s.recommend or s.sigma_min < s.sigma_max),
         "> 0" + ("" if s.recommend else " and < schedule.sigma_max")),
        ("schedule.num_levels", s.num_levels, s.num_levels >= 1, ">= 1"),
        ("optim.lr", o.lr, _finite_positive(o.lr), "a finite number > 0"),
        ("optim.beta1", o.beta1, 0 <= o.beta1 < 1, "in [0, 1)"),
        ("optim.beta2", o.beta2, 0 <= o.beta2 < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, math.isfinite(o.weight_decay) and o.weight_decay >= 0, "a finite number >= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip is None or _finite_positive(o.grad_clip), "a finite number > 0, or null"),
        ("train.steps", t.steps, t.steps >= 1, ">= 1"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("train.ema_decay", t.ema_decay, 0 <= t.ema_decay < 1, "in [0, 1)"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 1, ">= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.sample_every", t.sample_every, t.sample_every >= 1, ">= 1"),
        ("train.objective", t.objective, t.objective in ("dsm", "ssm"), "dsm or ssm"),
        ("tracking.flush_timeout", cfg.tracking.flush_timeout, cfg.tracking.flush_timeout >= 0, ">= 0"),
        ("sampling.num_samples", smp.num_samples, smp.num_samples >= 1, ">= 1"),
        ("sampling.steps_per_level", smp.steps_per_level, smp.steps_per_level >= 1, ">= 1"),
        ("sampling.eps", smp.eps, _finite_positive(smp.eps), "a finite number > 0"),
        ("sampling.workers", smp.workers, smp.workers >= 1, ">= 1"),
        ("sampling.chunk_size", smp.chunk_size, smp.chunk_size >= 1, ">= 1"),
        ("evaluation.resamples", cfg.evaluation.resamples, cfg.evaluation.resamples >= 10, ">= 10"),
        ("evaluation.feature_extractor", cfg.evaluation.feature_extractor, cfg.evaluation.feature_extractor in ("classifier", "inception"), "classifier or inception"),
        ("tune.trials", cfg.tune.trials, cfg.tune.trials >= 1, ">= 1"),
        ("tune.eval_every", cfg.tune.eval_every, cfg.tune.eval_every >= 1, ">= 1"),
        ("tune.eval_samples", cfg.tune.eval_samples, cfg.tune.eval_samples >= 2, ">= 2"),
        ("tune.metric", cfg.tune.metric, cfg.tune.metric in ("fid_classifier", "kid_classifier", "fid_inception", "kid_inception"),
         "one of fid_classifier, kid_classifier, fid_inception, kid_inception"),
        ("tune.steps_per_level", cfg.tune.steps_per_level, bool(cfg.tune.steps_per_level) and min(cfg.tune.steps_per_level) >= 1, "a non-empty list of T >= 1"),
        *[(f"tune.{k}", getattr(cfg.tune, k), len(getattr(cfg.tune, k)) == 2 and 0 < getattr(cfg.tune, k)[0] <= getattr(cfg.tune, k)[1],
           "[low, high] with 0 < low <= high") for k in ("sigma_max_scale", "sigma_min", "num_levels_scale", "eps_scale")],
        ("tune.confirm_top", cfg.tune.confirm_top, cfg.tune.confirm_top >= 0, ">= 0"),
        ("tune.confirm_seeds", cfg.tune.confirm_seeds, cfg.tune.confirm_seeds >= 2, ">= 2 (the interval needs two)"),
        ("tune.confirm_samples", cfg.tune.confirm_samples, cfg.tune.confirm_samples >= 2, ">= 2"),
        ("tune.grace_period", cfg.tune.grace_period, cfg.tune.grace_period >= 1, ">= 1"),
        ("tune.reduction_factor", cfg.tune.reduction_factor, cfg.tune.reduction_factor >= 2, ">= 2"),
        ("tune.max_concurrent", cfg.tune.max_concurrent, cfg.tune.max_concurrent is None or cfg.tune.max_concurrent >= 1, ">= 1 or null"),
        ("cluster.num_workers", cfg.cluster.num_workers, cfg.cluster.num_workers >= 1, ">= 1"),
        ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker, _finite_positive(cfg.cluster.cpus_per_worker), "a finite number > 0"),
        ("cluster.max_failures", cfg.cluster.max_failures, cfg.cluster.max_failures >= 0, ">= 0"),
    ]
    for key, value, valid, expected in checks:
        if not valid:
            raise ConfigError(f"{key} must be {expected}, got {value!r}", key)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the YAML at ``path`` (defaults when None), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text (UTF-8 YAML) file") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, …), got a {type(tree).__name__}")
    overridden = {_set_dotted(tree, assignment): assignment for assignment in overrides}
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        source = next((f"--set {a}" for k, a in overridden.items() if err.key and (err.key == k or err.key.startswith(k + "."))), None)
        where = f" (from {source})" if source else f" (in {path})" if path else ""
        raise ConfigError(f"{err}{where}", err.key) from None


def config_from_dict(tree: dict) -> Config:
    """A validated Config from a plain dict (YAML contents, or Config.to_dict() sent to a worker)."""
    cfg = _build(Config, tree, "")
    _validate(cfg)
    return cfg

