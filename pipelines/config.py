"""The pipeline's configuration: frozen pydantic models loaded from YAML, with dotted overrides
(`--set train.lr=2e-4`). Each section validates its own keys; errors name the key and where it came from."""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from ncsn._checks import first_line, is_positive_number
from ncsn.models import ModelConfig
from ncsn.sigmas import SAMPLERS, Sampler, geometric_sigmas


def default_cache_dir() -> Path:
    """The evaluation cache every command finds unless told another: $NCSN_CACHE, else ~/.cache/ncsn-pipeline."""
    return Path(os.environ.get("NCSN_CACHE") or Path.home() / ".cache" / "ncsn-pipeline").resolve()


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or invalid; the message names the key (also in ``key``)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class _Invalid(ValueError):
    """Raised inside a section's validator: ``key`` (relative to the section) must be ``expected``, got ``value``."""

    def __init__(self, expected: str, value: Any, key: str | None = None):
        super().__init__(f"must be {expected}, got {value!r}")
        self.key = key


def _rule(predicate: Callable[[Any], bool], expected: str) -> AfterValidator:
    """A field check whose error reads "<key> must be <expected>, got <value>"."""
    def check(value):
        if not predicate(value):
            raise _Invalid(expected, value)
        return value
    return AfterValidator(check)


def _number(value: Any) -> Any:
    """YAML 1.1 reads 2e-4 (no dot) as a string: such strings are numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _at_least(n: int) -> AfterValidator:
    return _rule(lambda v: v >= n, f">= {n}")


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, Strict(), BeforeValidator(_number)]
Positive = Annotated[Float, _rule(is_positive_number, "a finite number > 0")]
NonNegative = Annotated[Float, _rule(lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")]
UnitInterval = Annotated[Float, _rule(lambda x: 0 <= x < 1, "in [0, 1)")]
Count = Annotated[Int, _at_least(1)]
Range = Annotated[list[Float], _rule(lambda r: len(r) == 2 and 0 < r[0] <= r[1], "[low, high] with 0 < low <= high")]
# the tuning objectives and their extractors; kid_std: KID on standardised features (pipelines.evaluate.KID_FEATURES)
OBJECTIVES = {"kid_std_classifier": "classifier", "fid_classifier": "classifier", "kid_std_inception": "inception",
              "fid_inception": "inception"}


class Section(BaseModel):
    """A config section: frozen, no unknown keys, no silent type conversion (but for numbers written as strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_of(*choices: str) -> AfterValidator:
    return _rule(lambda v: v in choices, f"one of {', '.join(choices)}" if len(choices) > 2 else " or ".join(choices))


class DataConfig(Section):
    """Where the images come from and how they are read."""

    source: Annotated[Str, _one_of("digits", "cifar10", "mnist", "image-folder")] = "digits"
    input: Str | None = None  # tarball, idx directory or image folder (not for digits)
    shards: Str | None = None  # shard directory/URL; default: <run_dir>/shards/<source>
    shard_size: Count = 1000
    crop: Count | None = None
    resize: Count | None = None
    loader_workers: Annotated[Int, _at_least(0)] = 2
    shuffle_buffer: Annotated[Int, _at_least(0)] = 1000
    dequantize: Bool = True  # uniform dequantisation (NCSN §5)
    random_flip: Bool = False

    @model_validator(mode="after")
    def _input_for_files(self) -> DataConfig:
        if self.source != "digits" and self.input is None:
            raise _Invalid(f"a path for source {self.source!r}", None, "input")
        return self


class ScheduleConfig(Section):
    """The σ schedule; with recommend: true, NCSNv2's rules from the shard manifest's statistics."""

    recommend: Bool = False
    sigma_max: Positive = 1.0
    sigma_min: Positive = 0.01
    num_levels: Count = 10

    @model_validator(mode="after")
    def _decreasing(self) -> ScheduleConfig:
        if self.recommend:
            return self
        if self.num_levels == 1 and self.sigma_min != self.sigma_max:  # one noise level: σ_1 = σ_L
            raise _Invalid("schedule.sigma_max when schedule.num_levels is 1", self.sigma_min, "sigma_min")
        if self.num_levels > 1 and self.sigma_min >= self.sigma_max:
            raise _Invalid("> 0 and < schedule.sigma_max", self.sigma_min, "sigma_min")
        return self


class OptimConfig(Section):
    """Adam, as in the paper."""

    lr: Positive = 1e-3
    beta1: UnitInterval = 0.9
    beta2: UnitInterval = 0.999
    weight_decay: NonNegative = 0.0
    amsgrad: Bool = False
    grad_clip: Positive | None = None


class TrainConfig(Section):
    """The training loop."""

    steps: Count = 200_000
    batch_size: Count = 128
    ema_decay: UnitInterval = 0.999
    checkpoint_every: Count = 5000
    log_every: Count = 100
    sample_every: Count = 5000
    seed: Int = 0
    amp: Bool = True  # used on GPU only
    # dsm (denoising score matching) | ssm (sliced score matching, variance-reduced), per σ level
    objective: Annotated[Str, _one_of("dsm", "ssm")] = "dsm"
    # levels: each sample's σ one of the schedule's levels (NCSN); continuous: log-uniform between σ_L and σ_1 (score_sde's
    # continuous VE training), so samplers may step between the levels; arch ncsnv2 only
    sigma_sampling: Annotated[Str, _one_of("levels", "continuous")] = "levels"


class SamplingConfig(Section):
    """The sampler: annealed Langevin dynamics (als, Algorithm 1: x + (α/2) s + √α z, α = ε σ_i²/σ_L²), predictor–corrector
    (pc, score_sde) or EDM's probability-flow ODE solvers (euler, heun); with the sample set's size and its Ray actors."""

    sampler: Annotated[Str, _one_of(*SAMPLERS)] = "als"
    num_samples: Count = 1000
    steps_per_level: Count = 100  # als: T
    eps: Positive = 4e-5  # als: ε
    denoise: Bool = True  # als and pc: end with Tweedie's denoising step (euler and heun always end at σ = 0)
    sampler_steps: Count | None = None  # pc, euler, heun: the σ grid's size N; null: the model's own levels
    corrector_steps: Annotated[Int, _at_least(0)] = 1  # pc: Langevin corrector steps per level (0: predictor only)
    snr: Positive = 0.16  # pc: the corrector's target signal-to-noise ratio
    rho: Positive = 7.0  # euler, heun: EDM's grid exponent ρ
    churn: NonNegative = 0.0  # heun: S_churn
    # heun with churn > 0: churn only σ in [s_tmin, s_tmax] (null: no upper bound), its fresh noise scaled by s_noise
    s_tmin: NonNegative = 0.0
    s_tmax: Positive | None = None
    s_noise: Positive = 1.0
    workers: Count = 2
    chunk_size: Count = 100

    @model_validator(mode="after")
    def _sampler_settings(self) -> SamplingConfig:
        if self.sampler_steps is not None and self.sampler == "als":
            raise _Invalid("null with sampling.sampler als (Algorithm 1 walks the schedule's levels)", self.sampler_steps, "sampler_steps")
        if self.churn > 0 and self.sampler != "heun":
            raise _Invalid("0 unless sampling.sampler is heun (EDM Algorithm 2)", self.churn, "churn")
        for key, default in (("s_tmin", 0.0), ("s_tmax", None), ("s_noise", 1.0)):
            if getattr(self, key) != default and self.churn == 0:
                raise _Invalid(f"{default if default is not None else 'null'} unless sampling.churn > 0 (it shapes EDM Algorithm 2's churn)",
                               getattr(self, key), key)
        if self.s_tmax is not None and self.s_tmax <= self.s_tmin:
            raise _Invalid(f"above sampling.s_tmin = {self.s_tmin:g}, or null", self.s_tmax, "s_tmax")
        return self

    def sampler_spec(self) -> Sampler:
        """The sampler these settings name (Algorithm 1's ε and T go on the Schedule)."""
        return Sampler(self.sampler, self.sampler_steps, self.corrector_steps, self.snr, self.rho, self.churn, self.s_tmin,
                       self.s_tmax, self.s_noise)


class EvaluationConfig(Section):
    """The pipeline's final evaluation on torch-fidelity's feature extractors, in one convention: project (KID with a 95%
    interval, FID and one-split IS with bootstrap sds) or published (FID, IS over splits, KID over subsets; as papers
    report them). Tuning's objective is always the project convention."""

    convention: Annotated[Str, _one_of("project", "published")] = "project"
    # the reference images; train+validation: the data set's whole official training set (what CIFAR-10 papers compare with)
    reference_split: Annotated[Str, _one_of("train", "validation", "test", "train+validation")] = "test"
    reference_stats: Str | None = None  # FID against published statistics (.npz of mu, sigma); published convention only
    is_splits: Count = 10  # published convention: IS as the mean ± sd over this many splits
    kid_subsets: Count = 100  # published convention: KID as the mean ± sd over this many subsets …
    kid_subset_size: Annotated[Int, _at_least(3)] = 1000  # … of this many rows of each set
    feature_extractor: Annotated[Str, _one_of("classifier", "inception")] = "classifier"
    # each checkpoint scored by a Ray task on this many samples against the validation split (KID, FID), logged as an MLflow
    # LoggedModel; the best by KID is kept beside the latest and becomes model/checkpoint.pt. 0: the last checkpoint, unscored
    checkpoint_samples: Annotated[Int, _rule(lambda n: n == 0 or n >= 3, "0 or >= 3 (KID's interval needs 3)")] = 0
    inception_weights: Str | None = None  # a local weights file for air-gapped clusters
    resamples: Annotated[Int, _at_least(10)] = 200  # bootstrap resamples behind FID's and IS's sd
    # classifier weights, reference features, baselines (keyed by the shard set), on the evaluating node's disk; null: the
    # cache every command shares ($NCSN_CACHE, else ~/.cache/ncsn-pipeline), so the classifier trains once per shard set
    cache_dir: Annotated[Str, _rule(lambda s: "://" not in s, "a local directory, not a URL")] | None = None

    @model_validator(mode="after")
    def _stats_are_published(self) -> EvaluationConfig:
        if self.reference_stats is not None and self.convention != "published":
            raise _Invalid("null unless evaluation.convention is published (the project convention needs the reference's "
                           "features)", self.reference_stats, "reference_stats")
        return self


class TrackingConfig(Section):
    """MLflow; tracking_uri null means $MLFLOW_TRACKING_URI, else sqlite under the run directory."""

    tracking_uri: Str | None = None
    experiment: Str = "ncsn"
    system_metrics: Bool = True  # CPU, memory, disk, network (GPU with the `gpu` extra) of every host, every 10 s
    # seconds to wait at the end for an unreachable server before leaving it to sync-metrics
    flush_timeout: Annotated[Float, _rule(lambda x: x >= 0, ">= 0")] = 60.0
    register_model: Str | None = None  # also register the final model under this name in MLflow's model registry


class TuneConfig(Section):
    """Ray Tune over the σ schedule and the sampler. Ranges are [low, high]; the *_scale ones multiply the
    NCSNv2 recommendation for the data set, which is always trial 0 ("recommended")."""

    trials: Count = 16
    sigma_max_scale: Range = [0.5, 2.0]  # log-uniform × recommended σ_1
    sigma_min: Range = [0.005, 0.05]  # log-uniform
    num_levels_scale: Range = [0.5, 1.5]  # × recommended L, rounded
    eps_scale: Range = [0.3, 3.0]  # log-uniform × recommended ε
    steps_per_level: Annotated[list[Int], _rule(lambda ts: bool(ts) and min(ts) >= 1, "a non-empty list of T >= 1")] = [5, 10, 20]
    # sampler-only tuning (--checkpoint) also searches these samplers (als: over steps_per_level; pc with 0 and 1
    # corrector steps, euler and heun: over the σ grid sizes sampler_steps), keeping to max_nfe evaluations per image
    samplers: Annotated[list[Str], _rule(lambda ns: bool(ns) and set(ns) <= set(SAMPLERS), f"a non-empty list of {', '.join(SAMPLERS)}")] = ["als"]
    sampler_steps: Annotated[list[Int], _rule(lambda ns: bool(ns) and min(ns) >= 1, "a non-empty list of N >= 1")] = [6, 11, 18, 40]
    # heun's S_churn values searched (EDM Algorithm 2 when > 0; only 0 for a levels-only, arch ncsn, checkpoint)
    churn: Annotated[list[Float], _rule(lambda cs: bool(cs) and all(math.isfinite(c) and c >= 0 for c in cs),
                                        "a non-empty list of finite numbers >= 0")] = [0.0, 40.0]
    # … and, with churn > 0, its S_noise values (below 1: less noise added than removed, a lowered temperature)
    s_noise: Annotated[list[Float], _rule(lambda ns: bool(ns) and all(is_positive_number(n) for n in ns),
                                          "a non-empty list of finite numbers > 0")] = [1.0, 0.8]
    max_nfe: Count | None = None  # null: no budget
    eval_every: Count = 500  # training steps between objective evaluations (ASHA's rungs)
    eval_samples: Annotated[Int, _at_least(3)] = 250  # samples per evaluation of the objective (on the validation split)
    # unbiased KID on standardised features: its mean does not move with the count
    metric: Annotated[Str, _one_of(*OBJECTIVES)] = "kid_std_classifier"
    # selection (validation split): the k best trials and `recommended` re-scored on confirm_seeds fresh sampling seeds
    # (0: choose by the search's own evaluation); the finalists are the best searched schedules ranked above `recommended`
    select_top: Annotated[Int, _at_least(0)] = 3
    finalists: Count = 1  # judged against `recommended` on the test split (intervals Bonferroni-adjusted when > 1)
    # judgement (test split): each finalist's schedule and the recommended one trained again on this many fresh training
    # seeds (the unit of the verdict; paired across schedules); 0: no judgement. Sampler-only tuning judges on sampling seeds.
    confirm_train_seeds: Annotated[Int, _rule(lambda n: n == 0 or n >= 2, "0 or >= 2 (the interval needs two)")] = 3
    confirm_seeds: Annotated[Int, _rule(lambda n: n >= 2, ">= 2 (the interval needs two)")] = 3  # sampling seeds per network
    confirm_samples: Annotated[Int, _at_least(3)] = 1000  # … at this many samples per seed
    grace_period: Count = 1  # evaluations before ASHA may stop a trial
    reduction_factor: Annotated[Int, _at_least(2)] = 2
    max_concurrent: Count | None = None  # default: cluster CPUs (or GPUs) / resources per trial
    seed: Int = 0

    @property
    def extractor(self) -> str:
        """The feature extractor ``metric`` is measured with."""
        return OBJECTIVES[self.metric]


class ClusterConfig(Section):
    """Ray Train scaling and storage."""

    num_workers: Count = 1
    use_gpu: Bool = False
    cpus_per_worker: Positive = 1.0
    storage_path: Str | None = None  # default: <run_dir>/ray; shared or cloud storage on multi-node clusters
    shared_filesystem: Bool = False  # true: a local storage_path is mounted on every node (NFS, …)
    # async: a checkpoint is uploaded to storage_path in the background while training goes on; sync: training waits for it
    checkpoint_upload: Annotated[Str, _one_of("async", "sync")] = "async"
    max_failures: Annotated[Int, _at_least(0)] = 2


NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class Config(Section):
    """The whole pipeline configuration."""

    name: Annotated[Str, _rule(lambda s: re.fullmatch(NAME, s) is not None, "a plain name (letters, digits, '.', '_', '-'; "
                                                                              "no path): it names directories under run_dir")] = "ncsn"
    run_dir: Annotated[Str, _rule(lambda s: "://" not in s, "a local directory, not a URL (shards, checkpoints and "
                                                            "cluster.storage_path take object-store URLs)")] = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleConfig = ScheduleConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _between_levels_needs_any_sigma(self) -> Config:
        if self.sampling.churn > 0 and self.model.arch == "ncsn":
            raise _Invalid("0 with model.arch ncsn (churn evaluates the network between the levels it was trained on)",
                           self.sampling.churn, "sampling.churn")
        if self.train.sigma_sampling == "continuous" and self.model.arch == "ncsn":
            raise _Invalid("levels with model.arch ncsn (its normalisation is learnt per level)", "continuous", "train.sigma_sampling")
        return self

    @model_validator(mode="after")
    def _published_counts(self) -> Config:
        e, n = self.evaluation, self.sampling.num_samples
        if e.convention == "published" and n < max(e.kid_subset_size, e.is_splits):
            raise _Invalid(f"<= sampling.num_samples ({n}) with the published convention (KID draws subsets of this many "
                           "samples; IS splits them)", e.kid_subset_size if n < e.kid_subset_size else e.is_splits,
                           "evaluation.kid_subset_size" if n < e.kid_subset_size else "evaluation.is_splits")
        return self

    def sigmas(self):
        """The fixed σ schedule (when not recommended from data)."""
        return geometric_sigmas(self.schedule.sigma_max, self.schedule.sigma_min, self.schedule.num_levels)

    def eval_cache_dir(self) -> Path:
        """Where evaluation caches its classifier and features: evaluation.cache_dir, else the shared default (absolute,
        for Ray workers whose working directory is not the driver's)."""
        return Path(self.evaluation.cache_dir).resolve() if self.evaluation.cache_dir else default_cache_dir()

    def to_dict(self) -> dict:
        """Plain YAML-able data (what load_config reads back)."""
        return self.model_dump(mode="python")

    def evolve(self, changes: dict[str, object]) -> Config:
        """A validated copy with ``changes`` applied ({"run_dir": …, "tracking.tracking_uri": …}); this config is left as it
        is. An unknown key is a KeyError (a bug in the caller), an invalid value a ConfigError."""
        tree = self.to_dict()
        for key, value in changes.items():
            *sections, name = key.split(".")
            node = tree
            for part in sections:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or name not in node:
                raise KeyError(key)
            node[name] = value
        return config_from_dict(tree)


_TYPE_NAMES = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "list"}


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The section class at a location of the config (None past a leaf)."""
    cls: Any = Config
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = field.annotation
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _dotted_keys(cls: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every section and key of the config, dotted: data, data.source, …"""
    out = []
    for name, field in cls.model_fields.items():
        out.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _dotted_keys(field.annotation, f"{prefix}{name}.")
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


def _config_error(err: ValidationError) -> ConfigError:
    """The first of pydantic's errors as one line that names the dotted key."""
    first = err.errors(include_url=False)[0]
    loc = tuple(str(part) for part in first["loc"])
    key, kind, value = ".".join(loc), first["type"], first.get("input")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid):
        key = ".".join(loc + ((cause.key,) if cause.key else ()))
        return ConfigError(f"{key} {cause}", key)
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1]) or Config
        close = _suggest(key)
        hint = f"did you mean {close}? " if close else ""
        return ConfigError(f"unknown key {key}; {hint}known keys here: {', '.join(sorted(section.model_fields))}", key)
    if isinstance(cause, ValueError):  # a section defined elsewhere (ModelConfig) checks itself; its message names the key
        return ConfigError(str(cause), str(cause).split()[0])
    if kind in ("model_type", "dataclass_type", "dict_type") or _section_at(loc) is not None:
        return ConfigError(f"{key or 'the config'} must be a mapping, got {value!r}", key or None)
    expected = next((name for prefix, name in _TYPE_NAMES.items() if kind.startswith(prefix)), None)
    if value is None:
        return ConfigError(f"{key} must not be null", key)
    return ConfigError(f"{key} must be {expected}, got {value!r}" if expected else f"{key}: {first['msg']}, got {value!r}", key)


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
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({first_line(err)})") from None
    return key


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
    """A validated Config from a plain dict (YAML contents, or Config.to_dict())."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _config_error(err) from None
